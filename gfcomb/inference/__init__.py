"""Inference on top of the GFI, vectorized over samples, particles and chains:
importance sampling, particle filters and resampling, MCMC, parameter learning."""

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
    ChainResult,
    accept_reject,
    hmc,
    hmc_propose,
    is_batched_trace,
    mala,
    mala_propose,
    mh,
    mh_propose,
    mh_propose_custom,
    run_chain,
)
from gfcomb.inference.particle_filter import (
    ParticleFilterState,
    effective_sample_size,
    log_ml_estimate,
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

__all__ = [
    "ImportanceResamplingResult", "ImportanceResult", "ParticleFilterState", "RESAMPLERS",
    "effective_sample_size", "importance_resampling", "importance_sampling", "log_ml_estimate",
    "log_normalize", "multinomial_resample", "pf_initialize", "pf_rejuvenate", "pf_resample",
    "pf_update", "residual_resample", "stratified_resample", "systematic_resample",
    "ChainResult", "accept_reject", "hmc", "hmc_propose", "is_batched_trace", "mala",
    "mala_propose", "mh", "mh_propose", "mh_propose_custom", "run_chain",
    "batch_log_likelihood", "simulated_data", "train", "train_proposal",
    "progress_bar", "progress_enabled",
]
