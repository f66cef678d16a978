"""Saving and loading traces, choice maps, selections, particle-filter states and chain
results: ``gf.save(obj, file)`` / ``gf.load(file, gen_fns=None)`` (DESIGN §8).

The file is written with :func:`torch.save` and holds only tensors and plain containers
(dicts, lists, tuples, str, int, float, bool, None), so ``torch.load(file,
weights_only=True)`` reads it.  Objects are stored as tagged dicts (``{"__gf__": kind,
...}``):

* **generative functions** by *name*: a ``@gen`` function's ``__name__`` (or the name given
  with ``@gf.gen(name=...)``), a built-in distribution's ``name``, any other generative
  function's ``name`` / ``__name__`` attribute; the combinators Map, Unfold, Switch and
  Recurse by *structure* (their kernels' names and their settings).  On load a name is
  re-bound to ``gen_fns[name]`` when given, else to the built-in distribution of that
  name, else to the module-level object the function was defined as (looked up in modules
  already imported, never importing one), else :class:`PersistenceError` says which name
  to pass in ``gen_fns``;
* **records** (traces, ``ParticleFilterState``, ``ChainResult``, diffs: attrs classes
  defined in gfcomb, or registered with :func:`gfcomb.core.pytree.register_record`) by
  class name and their public constructor fields; private caches (``_layout``, ...) start
  afresh.  Public fields declared ``eq=False`` are bookkeeping (a @gen trace's argument
  sources): tensors inside them are stored as None (their identity is what counted), and
  a field that cannot be stored at all becomes None ("unknown", always correct);
* **choice maps and selections** through their ``reduce_parts`` (the state they pickle
  with).

A trace record holding something that is none of these (an opaque shared structure, such as
the step history of a batched Unfold trace in a particle filter) is stored *generically*:
its generative function, arguments and choices, and re-generated on load with the choices as
full constraints (vmapped over its batch axes).  That gives the same choices, arguments and
return value, and the score up to rounding (a density evaluated by another formula).  A
record class can instead define the protocol method :data:`PERSIST_HOOK`
(``__gf_persist__(self)``): return an equal record of the same class whose fields can be
stored (the history gathered into plain leaves, say); it is used before either route.

``gf.save(..., rng=True)`` also stores ``torch.get_rng_state()`` (and the CUDA generators'
states when CUDA is initialized); ``gf.load`` restores them (unless ``restore_rng=False``),
so that a particle filter or an MCMC chain saved mid-run and resumed draws what one that ran
through would have drawn.

``pickle`` and ``copy.deepcopy`` work on choice maps, selections and traces of module-level
generative functions: importing gfcomb registers (:mod:`copyreg`) reducers that pickle a
``@gen`` function and a built-in distribution by reference (so that a copied trace refers to
the very same function, as ``update`` requires).
"""

from __future__ import annotations

import copyreg
import importlib
import os
import pickle
import sys
from collections.abc import Mapping
from typing import IO, Any, Union

import attrs
import torch

from gfcomb.core.choicemap import ChoiceMap, rebuild_choicemap
from gfcomb.core.errors import PersistenceError
from gfcomb.core.gfi import GenerativeFunction
from gfcomb.core.pytree import RECORD_FIELDS
from gfcomb.core.selection import Selection
from gfcomb.core.trace import Trace

__all__ = ["PERSIST_HOOK", "from_payload", "load", "save", "to_payload"]

FORMAT = "gfcomb"
VERSION = 1
#: The optional protocol method of a record class: ``__gf_persist__(self) -> record``, an
#: equal record of the same class whose fields :func:`save` can store.
PERSIST_HOOK = "__gf_persist__"
_TAG = "__gf__"

FileLike = Union[str, "os.PathLike[str]", IO[bytes]]


class _Unstorable(Exception):
    """Internal: a value that cannot be stored (caught by the generic trace route)."""

    def __init__(self, what: str, path: str) -> None:
        super().__init__(what, path)
        self.what = what
        self.path = path


# ============================================================================ names
def gen_fn_name(gen_fn: GenerativeFunction) -> str:
    """The name a generative function is stored under (see the module docstring)."""
    from gfcomb.distributions.base import Distribution
    from gfcomb.dsl.gen_function import GenFunction

    if isinstance(gen_fn, GenFunction):
        return str(getattr(gen_fn, "__name__", type(gen_fn).__name__))
    if isinstance(gen_fn, Distribution):
        return str(gen_fn.name)
    for attr in ("name", "__name__"):
        v = getattr(gen_fn, attr, None)
        if isinstance(v, str):
            return v
    return type(gen_fn).__name__


def _combinator_parts(gen_fn: GenerativeFunction) -> tuple[str, dict[str, Any]] | None:
    """A built-in combinator's type name and constructor parts, else None."""
    from gfcomb.combinators import Map, Recurse, Switch, Unfold

    t = type(gen_fn)
    if t is Map:
        assert isinstance(gen_fn, Map)
        return "Map", {"kernel": gen_fn.kernel, "in_dims": gen_fn.in_dims,
                       "vectorize": gen_fn.vectorize}
    if t is Unfold:
        assert isinstance(gen_fn, Unfold)
        return "Unfold", {"kernel": gen_fn.kernel}
    if t is Switch:
        assert isinstance(gen_fn, Switch)
        return "Switch", {"branches": list(gen_fn.branches)}
    if t is Recurse:
        assert isinstance(gen_fn, Recurse)
        return "Recurse", {"production": gen_fn.production, "aggregation": gen_fn.aggregation,
                           "max_branch": gen_fn.max_branch,
                           "batch_depths": gen_fn.batch_depths}
    return None


def _build_combinator(kind: str, parts: dict[str, Any]) -> GenerativeFunction:
    from gfcomb.combinators import Map, Recurse, Switch, Unfold

    if kind == "Map":
        return Map(parts["kernel"], parts["in_dims"], vectorize=parts["vectorize"])
    if kind == "Unfold":
        return Unfold(parts["kernel"])
    if kind == "Switch":
        return Switch(*parts["branches"])
    if kind == "Recurse":
        return Recurse(parts["production"], parts["aggregation"],
                       max_branch=parts["max_branch"], batch_depths=parts["batch_depths"])
    raise PersistenceError(f"gf.load: unknown combinator {kind!r}")


def _module_level(module: Any, qualname: Any) -> Any:
    """The object ``module.qualname`` if that module is already imported (never imports)."""
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return None
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        if obj is None:
            return None
        obj = getattr(obj, part, None)
    return obj


def _is_module_level(g: GenerativeFunction) -> bool:
    """Is ``g`` a @gen function found as ``module.qualname`` of its defining function?"""
    fn = getattr(g, "fn", None)
    return _module_level(getattr(fn, "__module__", None),
                         getattr(fn, "__qualname__", None)) is g


# ============================================================================ encoding
class _Encoder:
    def __init__(self) -> None:
        self.memo: dict[int, Any] = {}  # id -> encoded generative function (shared refs)
        self.names: dict[str, GenerativeFunction] = {}  # name -> the function stored under it

    def value(self, x: Any, path: str, lossy: bool = False) -> Any:
        if isinstance(x, torch.Tensor):
            if lossy:  # bookkeeping: a tensor there stood for its identity
                return None
            if type(x) is not torch.Tensor and not isinstance(x, torch.nn.Parameter):
                raise _Unstorable(f"a tensor subclass {type(x).__name__}", path)
            return x.detach() if x.requires_grad else x
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        t = type(x)
        if t is tuple:
            return tuple(self.value(v, f"{path}[{i}]", lossy) for i, v in enumerate(x))
        if t is list:
            return [self.value(v, f"{path}[{i}]", lossy) for i, v in enumerate(x)]
        if t is dict:
            return {_TAG: "dict", "items": [
                [self.value(k, f"{path} key", lossy), self.value(v, f"{path}[{k!r}]", lossy)]
                for k, v in x.items()]}
        if t in (frozenset, set):
            return {_TAG: t.__name__, "items": [self.value(v, path, lossy) for v in x]}
        if t is slice:
            return {_TAG: "slice", "items": [self.value(v, path, lossy)
                                             for v in (x.start, x.stop, x.step)]}
        if isinstance(x, torch.dtype):
            return {_TAG: "dtype", "name": str(x).removeprefix("torch.")}
        if isinstance(x, torch.device):
            return {_TAG: "device", "name": str(x)}
        if isinstance(x, ChoiceMap):
            return {_TAG: "choicemap",
                    "parts": self.value(list(x.reduce_parts()), f"{path}<choicemap>", lossy)}
        if isinstance(x, Selection):
            cls, args = x.reduce_parts()
            return {_TAG: "selection", "class": cls.__qualname__,
                    "args": self.value(list(args), f"{path}<selection>", lossy)}
        if isinstance(x, GenerativeFunction):
            return self.gen_fn(x, path)
        if attrs.has(t):
            return self.record(x, path, lossy)
        raise _Unstorable(f"a {t.__module__}.{t.__qualname__} object", path)

    def gen_fn(self, g: GenerativeFunction, path: str) -> Any:
        hit = self.memo.get(id(g))
        if hit is not None:
            return hit
        parts = _combinator_parts(g)
        out: dict[str, Any]
        if parts is not None:
            kind, fields = parts
            out = {_TAG: "combinator", "type": kind,
                   "parts": {k: self.value(v, f"{path}.{k}") for k, v in fields.items()}}
        else:
            from gfcomb.distributions.base import Distribution
            from gfcomb.dsl.gen_function import GenFunction

            fn = getattr(g, "fn", None) if isinstance(g, GenFunction) else None
            out = {_TAG: "gen_fn", "name": gen_fn_name(g),
                   "kind": ("gen" if isinstance(g, GenFunction) else
                            "distribution" if isinstance(g, Distribution) else "other"),
                   "module": getattr(fn, "__module__", None),
                   "qualname": getattr(fn, "__qualname__", None)}
            other = self.names.setdefault(out["name"], g)
            if other is not g and out["kind"] != "distribution" and not (
                    _is_module_level(g) and _is_module_level(other)):  # (told apart by module)
                raise PersistenceError(
                    f"gf.save: two different generative functions are named {out['name']!r} "
                    f"({other!r} and {g!r}, at {path}), so gf.load could not tell them apart; "
                    "give them distinct names with @gf.gen(name=...)")
        self.memo[id(g)] = out
        return out

    def record(self, x: Any, path: str, lossy: bool = False) -> Any:
        t = type(x)
        hook = getattr(t, PERSIST_HOOK, None)
        if hook is not None:
            x = hook(x)
            if type(x) is not t:
                raise PersistenceError(f"gf.save: {t.__qualname__}.{PERSIST_HOOK} returned a "
                                       f"{type(x).__qualname__}, not a {t.__qualname__}")
        fields: dict[str, Any] = {}
        try:
            for f in attrs.fields(t):
                if not f.init or (f.name.startswith("_") and f.default is not attrs.NOTHING):
                    continue  # private caches (fields with a default) start afresh
                v = getattr(x, f.name)
                key = f.alias or f.name  # (a private data field is given by its alias)
                if f.eq:
                    fields[key] = self.value(v, f"{path}.{f.name}", lossy)
                else:  # bookkeeping: tensors dropped, unknown (None) if it cannot be stored
                    try:
                        fields[key] = self.value(v, f"{path}.{f.name}", True)
                    except _Unstorable:
                        fields[key] = None
        except _Unstorable:
            if isinstance(x, Trace):
                return self.generic_trace(x, path)
            raise
        return {_TAG: "record", "module": t.__module__, "class": t.__qualname__,
                "fields": fields}

    def generic_trace(self, tr: Trace, path: str) -> Any:
        """The generic route: generative function, arguments, choices, batch rank."""
        score = tr.score
        return {_TAG: "generated", "gen_fn": self.gen_fn(tr.gen_fn, f"{path}.gen_fn"),
                "args": self.value(tr.args, f"{path}.args"),
                "choices": self.value(tr.choices, f"{path}.choices"),
                "batch_ndim": score.dim() if isinstance(score, torch.Tensor) else 0}


def to_payload(obj: Any) -> tuple[Any, dict[str, GenerativeFunction]]:
    """``(payload, gen_fns)``: what :func:`save` writes for ``obj`` -- tensors in plain
    containers, every record's :data:`PERSIST_HOOK` applied (a batched Unfold trace's shared
    history gathered into plain per-row leaves) -- and the generative functions it names
    (name -> function), which :func:`from_payload` takes to rebuild the very same objects.

    Used to send the rows of a batch of traces between processes
    (:mod:`gfcomb.inference.distributed`).  Raises :class:`PersistenceError` naming the part
    of ``obj`` that cannot be stored.
    """
    enc = _Encoder()
    try:
        payload = enc.value(obj, "obj")
    except _Unstorable as err:
        raise PersistenceError(f"gf.save: cannot store {err.what} (at {err.path})") from None
    return payload, dict(enc.names)


def from_payload(payload: Any, gen_fns: Mapping[str, GenerativeFunction] | None = None) -> Any:
    """The object that :func:`to_payload` turned into ``payload`` (``gen_fns``: name ->
    generative function, as for :func:`load`)."""
    return _Decoder(gen_fns).value(payload)

def save(obj: Any, file: FileLike, *, rng: bool = False) -> None:
    """Write ``obj`` (a trace, single or batched; a ChoiceMap; a Selection; a
    ParticleFilterState; a ChainResult; or plain containers of these and tensors) to
    ``file`` (a path or a binary file object) with :func:`torch.save`.

    The file holds tensors and plain containers only: ``torch.load(file,
    weights_only=True)`` reads it; :func:`load` rebuilds the objects.  ``rng=True`` also
    stores the state of torch's random generators (see :func:`load`).  Raises
    :class:`PersistenceError` naming the part of ``obj`` that cannot be stored.
    """
    payload, _ = to_payload(obj)
    out: dict[str, Any] = {"format": FORMAT, "version": VERSION, "object": payload}
    if rng:
        out["rng"] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["rng"]["cuda"] = list(torch.cuda.get_rng_state_all())
    torch.save(out, file)


# ============================================================================ decoding
class _Decoder:
    def __init__(self, gen_fns: Mapping[str, GenerativeFunction] | None) -> None:
        if gen_fns is not None and not isinstance(gen_fns, Mapping):
            raise PersistenceError(f"gf.load: gen_fns must be a dict of name -> generative "
                                   f"function, got {type(gen_fns).__name__}")
        self.gen_fns = dict(gen_fns or {})
        for k, v in self.gen_fns.items():
            if not isinstance(v, GenerativeFunction):
                raise PersistenceError(f"gf.load: gen_fns[{k!r}] is not a generative "
                                       f"function: {v!r}")

    def value(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor) or x is None or isinstance(x, (bool, int, float, str)):
            return x
        t = type(x)
        if t is tuple:
            return tuple(self.value(v) for v in x)
        if t is list:
            return [self.value(v) for v in x]
        if t is not dict or _TAG not in x:
            raise PersistenceError(f"gf.load: unexpected {t.__name__} in the file")
        kind = x[_TAG]
        if kind == "dict":
            return {self.value(k): self.value(v) for k, v in x["items"]}
        if kind == "frozenset":
            return frozenset(self.value(v) for v in x["items"])
        if kind == "set":
            return {self.value(v) for v in x["items"]}
        if kind == "slice":
            return slice(*(self.value(v) for v in x["items"]))
        if kind == "dtype":
            dt = getattr(torch, x["name"], None)
            if not isinstance(dt, torch.dtype):
                raise PersistenceError(f"gf.load: unknown dtype {x['name']!r}")
            return dt
        if kind == "device":
            return torch.device(x["name"])
        if kind == "choicemap":
            return rebuild_choicemap(*self.value(x["parts"]))
        if kind == "selection":
            return self.selection(x)
        if kind in ("gen_fn", "combinator"):
            return self.gen_fn(x)
        if kind == "record":
            return self.record(x)
        if kind == "generated":
            return self.generated(x)
        raise PersistenceError(f"gf.load: unknown entry kind {kind!r}")

    def selection(self, x: dict[str, Any]) -> Selection:
        from gfcomb.core import selection as selection_module

        cls = getattr(selection_module, x["class"], None)
        if not (isinstance(cls, type) and issubclass(cls, Selection)):
            raise PersistenceError(f"gf.load: unknown selection class {x['class']!r}")
        args = self.value(x["args"])
        if cls.__qualname__ == "AllSelection":
            return Selection.all()
        if cls.__qualname__ == "NoneSelection":
            return Selection.none()
        return cls(*args)

    def gen_fn(self, x: dict[str, Any]) -> GenerativeFunction:
        if x[_TAG] == "combinator":
            parts = {k: self.value(v) for k, v in x["parts"].items()}
            return _build_combinator(x["type"], parts)
        name = x["name"]
        if name in self.gen_fns:
            return self.gen_fns[name]
        if x["kind"] == "distribution":
            import gfcomb.distributions as dists

            d = getattr(dists, name, None)
            if isinstance(d, GenerativeFunction) and gen_fn_name(d) == name:
                return d
        found = _module_level(x.get("module"), x.get("qualname"))
        if isinstance(found, GenerativeFunction) and gen_fn_name(found) == name:
            return found
        raise PersistenceError(
            f"gf.load: no generative function for the name {name!r}; pass it as "
            f"gf.load(file, gen_fns={{{name!r}: ...}})")

    def record(self, x: dict[str, Any]) -> Any:
        module, qualname = x["module"], x["class"]
        cls = _module_level(module, qualname)
        if cls is None and isinstance(module, str) and module.split(".")[0] == "gfcomb":
            importlib.import_module(module)  # (gfcomb's own modules only)
            cls = _module_level(module, qualname)
        if not (isinstance(cls, type) and attrs.has(cls)
                and (cls in RECORD_FIELDS or cls.__module__.split(".")[0] == "gfcomb")):
            raise PersistenceError(f"gf.load: unknown record class {module}.{qualname}")
        fields = {k: self.value(v) for k, v in x["fields"].items()}
        try:
            return cls(**fields)
        except TypeError as err:
            raise PersistenceError(f"gf.load: cannot rebuild {qualname}: {err}") from None

    def generated(self, x: dict[str, Any]) -> Trace:
        gen_fn = self.gen_fn(x["gen_fn"])
        args = self.value(x["args"])
        choices = self.value(x["choices"])
        return _regenerate(gen_fn, args, choices, int(x["batch_ndim"]))


def _regenerate(gen_fn: GenerativeFunction, args: tuple[Any, ...], choices: ChoiceMap,
                batch_ndim: int) -> Trace:
    """``gen_fn.generate(args, choices)``'s trace, vmapped over ``batch_ndim`` leading axes."""
    if batch_ndim == 0:
        return gen_fn.generate(args, choices)[0]
    from gfcomb.core.vmap import batched_call

    n = _leading_size(choices, args)

    def one(a: tuple[Any, ...], c: ChoiceMap) -> Trace:
        return _regenerate(gen_fn, a, c, batch_ndim - 1)

    call = batched_call(one, (0, 0), vectorize=True, length=n, who="gf.load")
    out: Trace = call(args, choices)
    return out


def _leading_size(*trees: Any) -> int:
    from gfcomb.core.pytree import tree_tensors

    for t in trees:
        for leaf in tree_tensors(t):
            if leaf.dim():
                return int(leaf.shape[0])
    raise PersistenceError("gf.load: a batched trace without batched tensors")


def load(file: FileLike, gen_fns: Mapping[str, GenerativeFunction] | None = None, *,
         restore_rng: bool = True, map_location: Any = None) -> Any:
    """Read what :func:`save` wrote (with ``torch.load(weights_only=True)``) and rebuild it.

    ``gen_fns``: name -> generative function, for the functions stored by name (see the
    module docstring; built-in distributions and module-level functions already imported
    are found without it).  If the file holds random-generator states (``save(...,
    rng=True)``) they are restored unless ``restore_rng=False``.  ``map_location`` is passed
    to :func:`torch.load`.  Raises :class:`PersistenceError` for a file of another format
    or a name it cannot bind.
    """
    decoder = _Decoder(gen_fns)
    try:
        raw = torch.load(file, weights_only=True, map_location=map_location)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as err:
        raise PersistenceError(f"gf.load: not a file written by gf.save (torch.load said: "
                               f"{str(err).splitlines()[0] if str(err) else type(err).__name__})"
                               ) from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise PersistenceError("gf.load: not a file written by gf.save")
    if raw.get("version") != VERSION:
        raise PersistenceError(f"gf.load: file format version {raw.get('version')!r}, this "
                               f"gfcomb reads version {VERSION}")
    obj = decoder.value(raw["object"])
    rng = raw.get("rng")
    if restore_rng and rng is not None:
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return obj


# ============================================================================ pickle / copy
def _gen_function_by_reference(module: str, qualname: str, name: str) -> GenerativeFunction:
    """Unpickle a @gen function: the module-level object it was (importing its module)."""
    importlib.import_module(module)
    found = _module_level(module, qualname)
    if not isinstance(found, GenerativeFunction):
        raise PersistenceError(f"cannot unpickle the @gen function {name!r}: "
                               f"{module}.{qualname} is not a generative function")
    return found


def _distribution_by_name(name: str) -> GenerativeFunction:
    import gfcomb.distributions as dists

    d = getattr(dists, name, None)
    if not isinstance(d, GenerativeFunction):
        raise PersistenceError(f"cannot unpickle the distribution {name!r}")
    return d


def _reduce_gen_function(g: Any) -> Any:
    fn = g.fn
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if _module_level(module, qualname) is g:
        return (_gen_function_by_reference, (module, qualname, gen_fn_name(g)))
    raise PersistenceError(
        f"cannot pickle {g!r}: only @gen functions defined at module level pickle (by "
        f"reference); use gf.save with gen_fns= for others")


def _reduce_distribution(d: Any) -> Any:
    import gfcomb.distributions as dists

    name: str = d.name
    if getattr(dists, name, None) is d:
        return (_distribution_by_name, (name,))
    return d.__reduce_ex__(2)  # a user's own instance: by value


def _register_reducers() -> None:
    """Register the by-reference reducers (copyreg: used by pickle and copy.deepcopy)."""
    from gfcomb.distributions.base import Distribution
    from gfcomb.dsl.gen_function import GenFunction

    copyreg.pickle(GenFunction, _reduce_gen_function)
    todo: list[type] = [Distribution]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls is not Distribution and getattr(cls, "__module__", "").startswith("gfcomb."):
            copyreg.pickle(cls, _reduce_distribution)


_register_reducers()
