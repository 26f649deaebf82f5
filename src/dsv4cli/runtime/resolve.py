"""What a MODEL argument names: one resolver for every command.

In order: an existing path (a checkpoint directory, or a config file where no weights are needed),
`demo` (the built-in model; also no argument at all), a user alias (`dsv4 alias`), a downloaded model's
name (`dsv4 list`), and
only where no weights are needed (info, plan, synth) a preset (`flash`, `pro`, `tiny`, ...). So a
downloaded `flash` wins over the `flash` preset, and every command says which one it used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dsv4cli.errors import ModelNotFound
from dsv4cli.model.args import ModelArgs

DIRECTORY, CONFIG, DOWNLOAD, DEMO, PRESET = "directory", "config file", "downloaded model", "demo", "preset"
#: the kinds of MODEL a command that runs weights accepts, and one that only reads a config
WITH_WEIGHTS = "a checkpoint directory, a downloaded model's name (dsv4 list), or `demo`"
CONFIG_ONLY = "a checkpoint directory or config.json, a downloaded model's name, `demo`, or a preset (flash, pro, ...)"


@dataclass(frozen=True)
class ModelRef:
    """A resolved MODEL argument: what it is (`kind`), where (`path`, None for a preset), its name."""

    name: str
    kind: str
    path: Path | None

    @property
    def is_demo(self) -> bool:
        return self.kind == DEMO

    def describe(self) -> str:
        """'flash: downloaded model at /data/...', 'flash: preset (config only, no weights)'."""
        if self.kind == PRESET:
            return f"{self.name}: {PRESET} (config only, no weights)"
        return f"{self.name}: {self.kind} at {self.path}"

    def args(self) -> ModelArgs:
        """The model's configuration."""
        if self.kind == PRESET:
            from dsv4cli.model.presets import get_preset

            return get_preset(self.name)
        return ModelArgs.from_file(self.path)


def resolve_model(model: str | None, *, weights: bool = True, aliases: bool = True) -> ModelRef:
    """Resolve a MODEL argument (None means the demo). `weights` False also accepts config files and
    presets (commands that only read the configuration). `aliases` False: user aliases are not consulted."""
    from dsv4cli.demo.model import DEMO_ALIAS, demo_model_dir

    if model is None or model == DEMO_ALIAS:
        return ModelRef(DEMO_ALIAS, DEMO, demo_model_dir())
    path = Path(model).expanduser()
    if path.is_dir():
        return ModelRef(path.name, DIRECTORY, path)
    if path.is_file() and not weights:
        return ModelRef(path.name, CONFIG, path)
    if aliases:
        from dsv4cli.hub.registry import alias_target

        target = alias_target(model)
        if target is not None:
            ref = resolve_model(target, weights=weights, aliases=False)
            return ModelRef(model, ref.kind, ref.path)
    local = _downloaded(model)
    if local is not None:
        return local
    if not weights:
        from dsv4cli.model.presets import PRESETS

        if model in PRESETS:
            return ModelRef(model, PRESET, None)
    raise ModelNotFound(f"no model {model!r}: MODEL is {WITH_WEIGHTS if weights else CONFIG_ONLY}",
                        "`dsv4 list` shows downloaded models, `dsv4 download flash` fetches one")


def _downloaded(name: str) -> ModelRef | None:
    """A complete download called `name`; an incomplete or damaged one is an error that says so."""
    from dsv4cli.hub.local import find_local_model

    try:
        local = find_local_model(name)
    except ModelNotFound:
        return None
    if local.damaged:
        raise ModelNotFound(f"the download of {name!r} in {local.path} is damaged ({local.damaged})",
                            f"remove it with `dsv4 rm {name}` and download it again")
    if not local.complete:
        raise ModelNotFound(f"the download of {name!r} in {local.path} is incomplete "
                            f"({local.files_present}/{local.files} files)", f"run `dsv4 download {name}` to finish it")
    return ModelRef(name, DOWNLOAD, local.path)
