"""What to compare: backbones x strategies x seeds, and the training config of each run.

Every run of a comparison is the base training config (a seed YAML, with its ``protocol`` preset and
``--options``) with four things changed: ``model.pfm_name``, ``model.finetune_mode.type``,
``model.pfm_weights_path`` (from ``weights``, else the base config's when it names the same backbone)
and ``system.seed``; outputs go to ``<output_dir>/runs/<pfm>__<strategy>/seed_<s>/``. The UNet
baseline (``unet``) is one row, strategy ``full``, head left at its default, whatever the strategies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, WeightsError, closest

FEATURE_CACHE_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class Combination:
    """One leaderboard row: a backbone and a tuning strategy."""

    pfm: str
    strategy: str

    @property
    def name(self) -> str:
        return f"{self.pfm}__{self.strategy}"

    def __str__(self) -> str:
        return f"{self.pfm} / {self.strategy}"


def _names(values: str | Iterable[str] | None) -> tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, str):
        values = values.split(",")
    out: list[str] = []
    for value in values:
        value = str(value).strip()
        if value and value not in out:
            out.append(value)
    return tuple(out)


def parse_seeds(value: str | int | Iterable[int] | None) -> tuple[int, ...]:
    """``3`` -> (0, 1, 2); ``"0,5,7"`` -> (0, 5, 7); None -> ()."""
    if value is None or value == "":
        return ()
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"seeds is {value}: give a number of seeds >= 1 (e.g. 3) or a list (e.g. 0,1,2).",
                              fix_with=("seeds",))
        return tuple(range(value))
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            numbers = [int(p) for p in parts]
        except ValueError as exc:
            raise ConfigError(f"seeds '{value}' is not a number of seeds (3) or a list of seeds (0,1,2).",
                              fix_with=("seeds",)) from exc
        if len(parts) == 1 and "," not in value:
            return parse_seeds(numbers[0])
        value = numbers
    seeds = tuple(int(s) for s in value)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"Seeds must be distinct, got {list(seeds)}.", fix_with=("seeds",))
    return seeds


def parse_weights(pairs: Iterable[str] | Mapping[str, str] | None) -> dict[str, str]:
    """``["uni_v1=/models/uni.bin", "phikon=hf-hub:"]`` -> {"uni_v1": ..., "phikon": "hf-hub:"} (names canonical)."""
    from ..backbones.registry import get_spec

    if pairs is None:
        return {}
    items: Iterable[tuple[str, str]] = pairs.items() if isinstance(pairs, Mapping) else []
    if not isinstance(pairs, Mapping):
        parsed: list[tuple[str, str]] = []
        for pair in pairs:
            if "=" not in pair:
                raise ConfigError(f"weights '{pair}' is not NAME=PATH (e.g. uni_v1=/models/uni/pytorch_model.bin).",
                                  fix_with=("CompareSpec.weights",))
            name, path = pair.split("=", 1)
            parsed.append((name.strip(), path.strip()))
        items = parsed
    out = {}
    for name, path in items:
        out[get_spec(name).name] = str(Path(path).expanduser()) if path and not path.startswith("hf-hub:") else path
    return out


@dataclass(frozen=True)
class CompareSpec:
    """The settings of a comparison besides the base training config.

    * ``pfms``: backbone names (``unet`` adds the UNet baseline row); ``strategies``: tuning
      strategies (empty: the base config's); ``seeds``: seeds per row (empty: the config's
      ``system.seeds``, else its ``system.seed``).
    * ``weights``: backbone name -> weights file or ``hf-hub:[repo]``. A full-size backbone without
      weights is a failed row (its random features would make the ranking meaningless); ``tiny``
      compares the small random-weight variants, for tests and demos only.
    * ``feature_cache``: ``auto`` trains every row on the fixed crop set when the config's augmentation
      allows it (symmetries of the square only, no zoom; see :mod:`.data`), else trains as ``train``
      does, and reads a frozen backbone's features from the cache when filling it pays: fewer windows
      to compute than the live backbone passes the cache replaces, and (with ``budget_s``) a fill
      estimated, from its first batch, to fit in the time those runs have; ``on`` requires it (an error
      names the augmentation keys to change); ``off`` never uses it. ``cache_dir`` (default
      ``<output_dir>/feature_cache``) may be shared between comparisons; ``cache_dtype`` float32
      (exact) or float16 (half the disk). ``crop_stride``: step of the fixed crop grid (default half
      the crop).
    * ``time_budget_s``: training time per run (combination x seed); a run stops at the epoch that
      would exceed it (at least one epoch) and is scored as it is.
    * ``budget_s``: wall time of the whole comparison, cache fill and scoring included: each run gets
      an equal share of what is left, and runs that would start after it is spent are not started
      (:mod:`.budget`).
    * ``n_bootstrap``: bootstrap resamples for the confidence intervals; ``throughput_steps``: batches
      timed for the inference windows/s column; ``device``: overrides ``system.device``.
    * ``checkpoints``: trained model files ranked as they are, beside (or, with no ``pfms``, instead of)
      the trained rows: each is scored once on the same images by the same code, so a model trained
      elsewhere (a live head, an earlier ``train``) is judged on equal terms without retraining.
    """

    pfms: tuple[str, ...]
    strategies: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()
    weights: Mapping[str, str] = field(default_factory=dict)
    tiny: bool = False
    feature_cache: str = "auto"
    cache_dir: str | None = None
    cache_dtype: str = "float32"
    crop_stride: int | None = None
    time_budget_s: float | None = None
    budget_s: float | None = None
    n_bootstrap: int = 1000
    throughput_steps: int = 5
    device: str | None = None
    checkpoints: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from ..backbones.registry import get_spec
        from ..tuning import STRATEGIES
        from .cache import DTYPES

        checkpoints = (self.checkpoints,) if isinstance(self.checkpoints, str | Path) else self.checkpoints
        object.__setattr__(self, "checkpoints", tuple(dict.fromkeys(
            str(Path(c).expanduser()) for c in checkpoints if str(c).strip())))
        pfms = tuple(dict.fromkeys(get_spec(name).name for name in _names(self.pfms)))
        if not pfms and not self.checkpoints:
            raise ConfigError("Name at least one backbone to compare in pfms (e.g. uni_v1,phikon,unet).",
                              fix_with=("pfms",))
        object.__setattr__(self, "pfms", pfms)
        strategies = _names(self.strategies)
        for strategy in strategies:
            if strategy not in STRATEGIES:
                raise ConfigError(f"Unknown tuning strategy '{strategy}'.{closest(strategy, STRATEGIES)} "
                                  f"Choose from: {', '.join(STRATEGIES)}.")
        object.__setattr__(self, "strategies", strategies)
        object.__setattr__(self, "seeds", parse_seeds(self.seeds) if not isinstance(self.seeds, tuple)
                           else tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "weights", parse_weights(self.weights))
        if self.feature_cache not in FEATURE_CACHE_MODES:
            raise ConfigError(f"feature_cache is '{self.feature_cache}'; choose one of "
                              f"{', '.join(FEATURE_CACHE_MODES)}.")
        if self.cache_dtype not in DTYPES:
            raise ConfigError(f"cache_dtype is '{self.cache_dtype}'; choose one of {', '.join(DTYPES)}.")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ConfigError(f"The time budget must be positive seconds, got {self.time_budget_s}.")
        if self.budget_s is not None and self.budget_s <= 0:
            raise ConfigError(f"The comparison's time budget must be positive seconds, got {self.budget_s}.")
        if self.crop_stride is not None and self.crop_stride < 1:
            raise ConfigError(f"crop_stride must be a positive number of pixels, got {self.crop_stride}.")
        if self.n_bootstrap < 1:
            raise ConfigError(f"n_bootstrap must be >= 1, got {self.n_bootstrap}.")

    # --- derived ----------------------------------------------------------------------------------
    def combinations(self, default_strategy: str) -> list[Combination]:
        """Rows in order: each backbone with each strategy; a from-scratch baseline once, strategy ``full``."""
        from ..backbones.registry import get_spec

        strategies = self.strategies or (default_strategy,)
        rows: list[Combination] = []
        for pfm in self.pfms:
            for strategy in ("full",) if get_spec(pfm).from_scratch else strategies:
                if Combination(pfm, strategy) not in rows:
                    rows.append(Combination(pfm, strategy))
        return rows

    def seeds_for(self, config: Any) -> tuple[int, ...]:
        return self.seeds or tuple(config.system.seeds or (config.system.seed,))

    def weights_for(self, pfm: str, config: Any) -> str | None:
        """The weights of backbone ``pfm``: ``weights``, else the base config's when it names ``pfm``."""
        from ..backbones.registry import get_spec

        if pfm in self.weights:
            return self.weights[pfm] or None
        if get_spec(config.model.pfm_name).name == pfm:
            return config.model.pfm_weights_path or None
        return None


def run_config(base: Any, combination: Combination, seed: int, run_dir: Path, *, weights: str | None,
               tiny: bool) -> Any:
    """The training config of one run: ``base`` with backbone, strategy, weights, seed and output folder set.

    Raises the config's own :class:`ConfigError` when the combination does not fit the base config
    (e.g. a CNN adapter with the ``light`` head, a crop that is not a multiple of the patch size), and
    :class:`WeightsError` for a full-size backbone without weights.
    """
    from ..backbones.registry import get_spec
    from ..training.config import config_from_dict
    from ..unet import DEFAULT_HEAD

    spec = get_spec(combination.pfm)
    tiny = bool(tiny or base.model.tiny)
    if not spec.from_scratch and not tiny and not weights:
        hub = f" (or {spec.name}=hf-hub: for {spec.hf_hub_id})" if spec.hf_hub_id else ""
        raise WeightsError(
            f"No weights for {spec.name}: add {spec.name}=/path/to/weights{hub} to the comparison's weights. A "
            "randomly initialised backbone would make its row meaningless (tiny=True compares small random test "
            "models only).", fix_with=("CompareSpec.weights", "tiny")
        )
    data = base.to_dict()
    model = data["model"]
    model.update(pfm_name=spec.name, emb_dim=None, tiny=tiny, model_type=None)
    if spec.from_scratch:
        model.update(head=DEFAULT_HEAD, feature_indices=None, pfm_weights_path=None)
        model["finetune_mode"]["type"] = "full"
    else:
        model["pfm_weights_path"] = weights
        model["finetune_mode"]["type"] = combination.strategy
    data["system"].update(seed=int(seed), seeds=None)
    # the comparison itself decides when a run is redone (its config changed): it may train over the old one
    data["logging"].update(log_dir=str(run_dir.parent), experiment_name=run_dir.name, overwrite=True)
    return config_from_dict(data, check_dataset=False)
