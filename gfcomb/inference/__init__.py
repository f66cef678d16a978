"""Inference on top of the GFI, vectorized over samples, particles and chains:
importance sampling, particle filters and resampling, MCMC, parameter learning, variational
inference, Gibbs / elliptical-slice / involutive MCMC, MAP, an SMC driver, ArviZ export."""

from gfcomb.inference.chains import ChainResult, run_chain
from gfcomb.inference.importance import (
    ImportanceResamplingResult,
    ImportanceResult,
    importance_resampling,
    importance_sampling,
)
from gfcomb.inference.learning import (
    batch_log_likelihood,
    simulated_data,
    train,
    train_proposal,
)
from gfcomb.inference.mcmc import (
    accept_reject,
    hmc,
    hmc_propose,
    is_batched_trace,
    mala,
    mala_propose,
    mh,
    mh_propose,
    mh_propose_custom,
)
from gfcomb.inference.particle_filter import (
    ParticleFilterState,
    effective_sample_size,
    log_ml_estimate,
    pf_check,
    pf_initialize,
    pf_rejuvenate,
    pf_resample,
    pf_update,
)
from gfcomb.inference.progress import progress_bar, progress_enabled
from gfcomb.inference.resampling import (
    RESAMPLERS,
    log_normalize,
    multinomial_resample,
    residual_resample,
    stratified_resample,
    systematic_resample,
)

# isort: split
# compiled steps (issue 12)
from gfcomb.inference.compiled import CaptureError, compile_step

# isort: split
# variational inference, more MCMC, SMC, diagnostics (issue 13)
from gfcomb.inference.breadth import ANY, select_pattern
from gfcomb.inference.diagnostics import to_inference_data, variable_name
from gfcomb.inference.elliptical import elliptical_slice
from gfcomb.inference.gibbs import gibbs
from gfcomb.inference.involutive import involutive_mcmc, log_abs_det_jacobian
from gfcomb.inference.map_opt import map_optimize
from gfcomb.inference.smc import SMCResult, default_argdiffs, smc
from gfcomb.inference.vi import ESTIMATORS, VIResult, elbo, fit_vi, iwae_bound

__all__ = [
    "ImportanceResamplingResult", "ImportanceResult", "ParticleFilterState", "RESAMPLERS",
    "effective_sample_size", "importance_resampling", "importance_sampling", "log_ml_estimate",
    "log_normalize", "multinomial_resample", "pf_initialize", "pf_rejuvenate", "pf_resample",
    "pf_update", "residual_resample", "stratified_resample", "systematic_resample",
    "ChainResult", "accept_reject", "hmc", "hmc_propose", "is_batched_trace", "mala",
    "mala_propose", "mh", "mh_propose", "mh_propose_custom", "run_chain",
    "batch_log_likelihood", "simulated_data", "train", "train_proposal",
    "progress_bar", "progress_enabled",
    "ANY", "ESTIMATORS", "SMCResult", "VIResult", "default_argdiffs", "elbo",
    "elliptical_slice", "fit_vi", "gibbs", "involutive_mcmc", "iwae_bound",
    "log_abs_det_jacobian", "map_optimize", "select_pattern", "smc", "to_inference_data",
    "variable_name",
    # compiled steps (issue 12)
    "CaptureError", "compile_step", "pf_check",
]
