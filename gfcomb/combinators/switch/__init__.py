"""Switch: choose one of several generative functions by an index argument.

* :mod:`~gfcomb.combinators.switch.combinator` -- the :class:`Switch` combinator, its GFI and
  its edit engine (update and regenerate);
* :mod:`~gfcomb.combinators.switch.trace` -- :class:`SwitchTrace`;
* :mod:`~gfcomb.combinators.switch.merge` -- merging the branches by the index (batched index);
* :mod:`~gfcomb.combinators.switch.edit` -- changing branch: generating the new branch reusing
  the old choices.
"""

from gfcomb.combinators.switch.combinator import Switch
from gfcomb.combinators.switch.trace import SwitchTrace

__all__ = ["Switch", "SwitchTrace"]
