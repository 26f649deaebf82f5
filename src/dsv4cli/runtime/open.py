"""Opening a model: the one way every command gets from a MODEL argument to a runnable model.

`open_model` resolves the argument (`runtime.resolve`), selects the kernels (their notices are
collected, never printed), reads the tokenizer, maps the checkpoint into a model (memory-mapped; no
MTP layer unless asked for) and, when placement options are given, places it. Leaving the `with`
block detaches the placement and closes the checkpoint's mappings.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from dsv4cli.chat.tokenizer import Tokenizer
from dsv4cli.errors import CheckpointError, UsageError
from dsv4cli.io.checkpoint import SYNTH_MARKER, Checkpoint
from dsv4cli.model.layers import Numerics
from dsv4cli.model.transformer import Transformer
from dsv4cli.runtime.apply import Placement, place_by_options
from dsv4cli.runtime.loader import load_model
from dsv4cli.runtime.options import PlacementOptions
from dsv4cli.runtime.resolve import ModelRef, resolve_model


@dataclass
class OpenModel:
    model: Transformer
    checkpoint: Checkpoint
    ref: ModelRef
    tokenizer: Tokenizer | None
    label: str
    placement: Placement = field(default_factory=Placement)
    #: one-line notices for the user: kernel selection, placement warnings, weights larger than RAM
    notices: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.ref.path

    @property
    def is_demo(self) -> bool:
        return self.ref.is_demo


def model_label(ref: ModelRef, model: Transformer) -> str:
    if ref.is_demo:
        from dsv4cli.demo.model import DEMO_LABEL

        return DEMO_LABEL
    return f"{ref.name} ({model.args.n_layers} layers, {model.args.n_routed_experts} experts)"


@contextmanager
def open_model(model: str | ModelRef | None, *, numerics: Numerics | None = None,
               placement: PlacementOptions | None = None, context: int = 16384, with_mtp: bool = False,
               tokenizer: bool = True) -> Iterator[OpenModel]:
    """An opened model for the block's duration.

    `model`: a MODEL argument (None: the demo) or an already resolved `ModelRef`. `placement`: place
    dense weights, KV cache and experts by these options (None: stay on the CPU, memory-mapped).
    `tokenizer`: read the checkpoint's tokenizer.json (and check it fits the vocabulary)."""
    from dsv4cli import kernels

    ref = model if isinstance(model, ModelRef) else resolve_model(model, weights=True)
    notices = kernels.select()
    # the weights first (memory-mapped, cheap): a directory without them is named for that, not for its tokenizer
    net, checkpoint = load_model(ref.path, numerics, with_mtp=with_mtp)
    opened = OpenModel(net, checkpoint, ref, None, model_label(ref, net), notices=notices)
    try:
        if tokenizer and (ref.path / SYNTH_MARKER).is_file() and not (ref.path / "tokenizer.json").is_file():
            raise UsageError(f"{ref.path} holds random weights from `dsv4 synth`, for tests and benchmarks: "
                             "no tokenizer, nothing to chat with",
                             f"benchmark it with `dsv4 bench {ref.path}`, or chat with the demo model: `dsv4 chat`")
        vocabulary = opened.tokenizer = Tokenizer.from_dir(ref.path) if tokenizer else None
        if vocabulary is not None and vocabulary.vocab_size > net.args.vocab_size:
            raise CheckpointError(f"the tokenizer in {ref.path} has {vocabulary.vocab_size} tokens but the model "
                                  f"only {net.args.vocab_size}", "use the tokenizer.json that came with the checkpoint")
        if placement is not None:
            opened.placement = place_by_options(net, placement, context, ref.path)
            opened.notices.extend(opened.placement.warnings)
        yield opened
    finally:
        opened.placement.detach()
        checkpoint.close()
