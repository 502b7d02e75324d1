"""In-context learning on numerical prompts and reweighted ICL (RICL / LARICL, arXiv 2310.03331).

* :mod:`models.icl.tasks`     prompt generator (balanced, biased, class-imbalanced) and D_val
* :mod:`models.icl.model`     small GPT-2 block stack with real-valued read-in (soft prompts)
* :mod:`models.icl.train`     offline training on balanced prompts, cached by a config key
* :mod:`models.icl.reweight`  RICL, LARICL and the client-side entry point for the federation
* :mod:`models.icl.baselines` fine-tuning and prefix tuning on the same validation set
* :mod:`models.icl.toys`      closed-form in-context learners used by the tests

Federated client mode: each client holds the frozen model, the shared prompt (or its own)
and a private validation split from D_val; it calls :func:`ricl_client_weights` and sends
back only the m weights and its validation size; the server combines replies with
:func:`aggregate_client_weights` (validation-size-weighted mean).
"""

from models.icl.model import ICLModelConfig, ICLTransformer
from models.icl.reweight import (
    ReweightResult, aggregate_client_weights, laricl_weights, ricl_client_weights, ricl_weights, val_objective,
)
from models.icl.tasks import ICLTask, Prompt, sample_prompt, sample_queries
from models.icl.train import train_icl_model

__all__ = [
    "ICLModelConfig", "ICLTask", "ICLTransformer", "Prompt", "ReweightResult", "aggregate_client_weights",
    "laricl_weights", "ricl_client_weights", "ricl_weights", "sample_prompt", "sample_queries", "train_icl_model",
    "val_objective",
]
