"""The one configuration object of a training run, and its command-line flags.

Every field of :class:`TrainConfig` becomes a ``mnist-jax train`` flag in
:func:`add_config_flags`; :func:`config_from_args` turns parsed flags back into a
validated config: the named recipe's values (:data:`RECIPES`, ``--recipe``), then every
flag given on the command line over them. Nothing else in the package defines
training flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from typing import Any

from mnist_jax.errors import UsageError
from mnist_jax.names import DATASETS, IMPLS, MODELS

DTYPES = ("float32", "bfloat16")
SCHEDULES = ("constant", "cosine", "onecycle")
OPTIMIZERS = ("adam", "adamw", "sgd")
CUSTOM = "custom"
"""``optimizer`` as recorded for a run trained with an optax optimizer of the user's."""

RECIPES: dict[str, dict[str, Any]] = {
    # The Keras tutorial: the 784-784-10 MLP, Adam(1e-3), 100 epochs at batch 128.
    "tutorial": {},
    # The classic Keras MNIST convnet, 12 epochs (keras.io's mnist_cnn.py).
    "keras-cnn": {"model": "cnn", "epochs": 12},
    # The one-epoch record (tuomaso/train_mnist_fast): a small CNN, standardised inputs,
    # Adam(1e-2, betas 0.7/0.9) under PyTorch's OneCycleLR defaults, batch 256, 1 epoch.
    "speedrun": {"model": "smallcnn", "epochs": 1, "batch_size": 256,
                 "learning_rates": (1e-2,), "betas": (0.7, 0.9), "adam_eps": 1e-8,
                 "lr_schedule": "onecycle", "warmup": 0.3},
    # Towards the single-model records (99.64-99.74%): a BatchNorm CNN trained on
    # augmented digits (random affine drawn on the device), label smoothing, one-cycle
    # Adam; its settings follow cdeotte/MNIST-CNN-99.75's augmentation and BatchNorm,
    # checked on a 6,000-image validation split (docs: Results), never on the test set.
    # 12 epochs: planned as the most that fits a budget of 15 minutes per seed on a small
    # CPU (the docs' Results page gives the minutes measured).
    # Less dropout than bncnn's (cdeotte's 0.25 / 0.4, set for 45 epochs): adopted on fresh
    # validation seeds by a rule fixed before they ran (the docs' Experiments page).
    "best": {"model": "bncnn", "model_args": '{"conv_dropout": 0.1, "dense_dropout": 0.2}',
             "epochs": 12, "batch_size": 128, "learning_rates": (3e-3,),
             "adam_eps": 1e-8, "lr_schedule": "onecycle", "warmup": 0.2,
             "label_smoothing": 0.1, "augment": "rotation=10,scale=0.1,shear=5,translate=2.5"},
}
"""Named complete settings for ``--recipe`` / :meth:`TrainConfig.from_recipe`: each maps
fields to values over :class:`TrainConfig`'s defaults (which are ``tutorial``)."""


def _merge_json(base: str, over: str | None) -> str | None:
    """``over``'s keys over ``base``'s, both JSON objects; ``over`` as given if it is not
    one, so that validation names the user's own text."""
    try:
        theirs = json.loads(over) if over is not None else None
    except json.JSONDecodeError:
        return over
    if not isinstance(theirs, dict):
        return over
    return json.dumps({**json.loads(base), **theirs})


def _field(default: Any, help: str, *, flag: str | None = None, choices: tuple | None = None,
           aliases: tuple[str, ...] = ()) -> Any:
    meta = {"help": help, "flag": flag, "choices": choices, "aliases": aliases}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed in a frozen config")
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (and nothing that doesn't).

    The defaults reproduce the Keras tutorial: the 784-784-10 MLP with dropout 0.4,
    Adam with Keras' defaults, 100 epochs at batch size 128 on MNIST.
    ``seeds`` × ``learning_rates`` models are trained together in one compiled
    program (``jax.vmap`` over the train state) when there is more than one.
    """

    recipe: str = _field("tutorial", "named recipe whose values the other flags override",
                         choices=tuple(RECIPES))
    model: str = _field(
        "mlp", f"model to train: {', '.join(MODELS)}, or a Flax module of yours as "
        "path/to/file.py:ClassName or package.module:ClassName")
    model_args: str | None = _field(
        None, "JSON object of constructor arguments for the model: a preset's fields (e.g. "
              "'{\"weight_init\": \"torch\"}') or those of a --model of yours")
    dataset: str = _field("mnist", "dataset to train on", choices=DATASETS)
    data_dir: str | None = _field(
        None, "folder with the IDX archives (default: $MNIST_JAX_DATA_DIR; neither: download "
              "the official archives into the cache)")
    epochs: int = _field(100, "number of epochs")
    batch_size: int = _field(128, "global batch size (split across devices)")
    seeds: tuple[int, ...] = _field(
        (0,), "random seed, or a comma-separated list to train one model per seed",
        flag="--seeds", aliases=("--seed",))
    optimizer: str = _field("adam", "optimizer (optax)", choices=OPTIMIZERS)
    learning_rates: tuple[float, ...] = _field(
        (1e-3,), "learning rate, or a comma-separated list for a sweep", flag="--lr")
    adam_eps: float = _field(1e-7, "epsilon of adam and adamw (Keras' default)")
    betas: tuple[float, ...] = _field((0.9, 0.999), "beta1,beta2 of adam and adamw")
    weight_decay: float = _field(0.0, "decoupled weight decay of adamw")
    momentum: float = _field(0.0, "momentum of sgd")
    lr_schedule: str = _field(
        "constant", "learning-rate schedule over the run's --epochs: constant (Keras' "
        "default), cosine decay to 0, or onecycle (PyTorch's OneCycleLR)", choices=SCHEDULES)
    warmup: float = _field(0.0, "fraction of the run spent warming up (cosine: linear "
                                "warm-up; onecycle: its rising part, default 0.25)")
    label_smoothing: float = _field(0.0, "label smoothing of the cross-entropy")
    augment: str = _field(
        "none", "augmentation drawn on the device, e.g. "
        "rotation=10,scale=0.1,shear=5,translate=2.5,elastic=0 (degrees, fraction, degrees, "
        "pixels, pixels), or none")
    validation_split: float = _field(
        0.0, "fraction of the training data held out for validation (last part, as Keras); "
             "the test set is then evaluated only after the last epoch")
    hidden: tuple[int, ...] = _field((), "MLP hidden sizes, comma-separated (default 784)")
    dropout: float | None = _field(None, "dropout rate of the MLP (default 0.4)")
    impl: str = _field("auto", "how convolutions run: auto (on the CPU the fast paths: the preset "
                       "CNNs' own, and your module's convolutions rewritten as im2col + "
                       "matmul; XLA's on GPUs/TPUs), fast (those paths everywhere), or xla "
                       "(XLA's convolutions everywhere)", choices=IMPLS)
    dtype: str = _field("float32", "compute dtype of the presets (params stay float32)",
                        choices=DTYPES)
    devices: int | None = _field(None, "number of local devices to shard the batch over "
                                       "(default: all)")
    checkpoint_every: int = _field(1, "save a checkpoint every N epochs (0: never)")
    keep_checkpoints: int = _field(3, "number of newest checkpoints to keep")

    @property
    def num_models(self) -> int:
        return len(self.seeds) * len(self.learning_rates)

    def model_grid(self) -> list[dict[str, Any]]:
        """One ``{"seed", "lr"}`` dict per model, seeds varying slowest."""
        return [{"seed": s, "lr": lr} for s in self.seeds for lr in self.learning_rates]

    def total_steps(self, train_examples: int) -> int:
        """Optimizer steps of the whole run, given the training set's size before the
        validation split (every epoch drops its last partial batch)."""
        from mnist_jax.data import training_count
        kept = training_count(train_examples, self.validation_split)
        return self.epochs * (kept // self.batch_size)

    @classmethod
    def from_recipe(cls, name: str = "tutorial", **overrides: Any) -> "TrainConfig":
        """The named recipe (:data:`RECIPES`) with ``overrides`` on top, validated.

        ``model_args`` merges key by key (the override's keys win) while the model stays the
        recipe's; another ``model`` drops the recipe's ``model_args``, which were its model's.
        An override of a setting that the resolved optimizer, schedule or model does not
        read (:data:`SETTING_OF`) is a :class:`UsageError`.
        """
        if name not in RECIPES:
            raise UsageError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
        recipe = dict(RECIPES[name])
        own_model = recipe.get("model", cls.model)
        if overrides.get("model", own_model) != own_model:
            recipe.pop("model_args", None)  # the recipe's model arguments are its model's
        if "model_args" in recipe and "model_args" in overrides:
            overrides = {**overrides,
                         "model_args": _merge_json(recipe["model_args"], overrides["model_args"])}
        config = cls(**{**recipe, "recipe": name, **overrides}).validate()
        _check_settings(config, overrides)
        return config

    @property
    def is_builtin_model(self) -> bool:
        return self.model in MODELS

    def model_kwargs(self) -> dict[str, Any]:
        """Overrides passed to :func:`mnist_jax.models.create_model` (``model_args`` last)."""
        kw: dict[str, Any] = {"dtype": self.dtype}
        if self.model == "mlp":
            if self.hidden:
                kw["hidden"] = self.hidden
            if self.dropout is not None:
                kw["dropout"] = self.dropout
        else:
            kw["impl"] = self.impl
        args = json.loads(self.model_args or "{}")
        return {**kw, **{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}}

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        return cls(**kw).validate()

    def validate(self) -> "TrainConfig":
        """Raise :class:`UsageError` naming the first invalid value; return self."""
        def bad(flag: str, value: Any, why: str) -> UsageError:
            return UsageError(f"invalid {flag} {value!r}: {why}")

        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices and not (f.name == "optimizer" and value == CUSTOM):
                raise bad(_flag(f), value, f"choose from {', '.join(choices)}")
        if self.model not in MODELS and ":" not in self.model:
            raise bad("--model", self.model, f"choose from {', '.join(MODELS)}, or give "
                      "path/to/file.py:ClassName or package.module:ClassName")
        if self.model_args is not None:
            try:
                if not isinstance(json.loads(self.model_args), dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                raise bad("--model-args", self.model_args, f"expected a JSON object ({e})")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise bad("--betas", self.betas, "expected two numbers in [0, 1)")
        for flag, value in (("--weight-decay", self.weight_decay), ("--momentum", self.momentum)):
            if not math.isfinite(value) or value < 0:
                raise bad(flag, value, "must be a non-negative finite number")
        for flag, value in (("--warmup", self.warmup), ("--label-smoothing", self.label_smoothing)):
            if not 0.0 <= value < 1.0:
                raise bad(flag, value, "must be in [0, 1)")
        from mnist_jax.augment import AugmentSpec
        try:
            AugmentSpec.parse(self.augment)
        except UsageError as e:  # "invalid augmentation TEXT: why" → "invalid --augment TEXT: why"
            raise bad("--augment", self.augment, str(e).split(": ", 1)[-1]) from None
        if self.epochs < 1:
            raise bad("--epochs", self.epochs, "must be at least 1")
        if self.batch_size < 1:
            raise bad("--batch-size", self.batch_size, "must be at least 1")
        if not self.seeds or any(not 0 <= s < 2**31 for s in self.seeds):
            # a seed is a jax PRNG key's int32
            raise bad("--seeds", self.seeds, "seeds must be integers from 0 to 2147483647")
        if len(set(self.seeds)) != len(self.seeds):
            raise bad("--seeds", self.seeds, "seeds must be distinct")
        if len(set(self.learning_rates)) != len(self.learning_rates):
            raise bad("--lr", self.learning_rates, "learning rates must be distinct")
        for lr in self.learning_rates:
            if not math.isfinite(lr) or lr <= 0:
                raise bad("--lr", lr, "learning rate must be a positive finite number")
        if not math.isfinite(self.adam_eps) or self.adam_eps <= 0:
            raise bad("--adam-eps", self.adam_eps, "must be a positive finite number")
        if not 0.0 <= self.validation_split < 1.0:
            raise bad("--validation-split", self.validation_split, "must be in [0, 1)")
        if any(h < 1 for h in self.hidden):
            raise bad("--hidden", self.hidden, "layer sizes must be positive")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise bad("--dropout", self.dropout, "must be in [0, 1)")
        if self.devices is not None and self.devices < 1:
            raise bad("--devices", self.devices, "must be at least 1")
        if self.checkpoint_every < 0:
            raise bad("--checkpoint-every", self.checkpoint_every, "must be 0 or more")
        if self.keep_checkpoints < 1:
            raise bad("--keep-checkpoints", self.keep_checkpoints, "must be at least 1")
        return self


USER_MODEL = "a module of yours"
"""Stands in :data:`SETTING_OF` for every ``--model`` that is not a preset."""

SETTING_OF: dict[str, tuple[str, tuple[str, ...]]] = {
    "betas": ("optimizer", ("adam", "adamw")), "adam_eps": ("optimizer", ("adam", "adamw")),
    "weight_decay": ("optimizer", ("adamw",)), "momentum": ("optimizer", ("sgd",)),
    "warmup": ("lr_schedule", ("cosine", "onecycle")),
    "hidden": ("model", ("mlp",)), "dropout": ("model", ("mlp",)),
    "impl": ("model", tuple(m for m in MODELS if m != "mlp") + (USER_MODEL,)),
    "dtype": ("model", MODELS),
}
"""The fields read only under some values of another: field -> (that field, its values)
(:func:`mnist_jax.training.make_optimizer`, :meth:`TrainConfig.model_kwargs`)."""


def _check_settings(config: TrainConfig, given: dict[str, Any]) -> None:
    """Refuse a value ``given`` for a field that ``config`` would silently ignore
    (``--momentum`` with adam, ``--dropout`` with the CNN, ``--warmup`` with a constant rate);
    a recipe's own values are not the user's and pass."""
    for name, (owner, values) in SETTING_OF.items():
        value = getattr(config, owner)
        kind = USER_MODEL if owner == "model" and not config.is_builtin_model else value
        if name in given and kind not in values and value != CUSTOM:
            owner_flag = _flag(_FIELDS[owner])
            hint = (" (its own fields go in --model-args)"
                    if owner == "model" and value != "mlp" else "")
            raise UsageError(f"{_flag(_FIELDS[name])} is a setting of {owner_flag} "
                             f"{' or '.join(values)}; {owner_flag} {value} does not use it{hint}")
    if given.get("warmup") == 0 and config.lr_schedule == "onecycle":  # 0 is the default
        raise UsageError("invalid --warmup 0.0: the one-cycle schedule rises over a fraction of "
                         "the run in (0, 1); leave --warmup out for its default, 0.25")
    if "keep_checkpoints" in given and config.checkpoint_every == 0:
        raise UsageError("--keep-checkpoints has nothing to keep with --checkpoint-every 0 "
                         "(no checkpoints)")


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _parser_for(f: dataclasses.Field):
    """The argparse ``type`` for a field, derived from its annotation."""
    ann = str(f.type)
    if ann.startswith("tuple[int"):
        elem = int
    elif ann.startswith("tuple[float"):
        elem = float
    else:
        elem = None
    if elem is not None:
        def parse_list(text: str) -> tuple:
            try:
                return tuple(elem(v) for v in text.split(",") if v.strip())
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"expected comma-separated {elem.__name__}s, got {text!r}") from None
        return parse_list
    if "int" in ann and "float" not in ann:
        return int
    if "float" in ann:
        return float
    return str


MODEL_FIELDS = ("recipe", "model", "model_args", "hidden", "dropout", "impl", "dtype")
"""The fields that say which model a run builds (:func:`mnist_jax.run.build_model`)."""


def add_config_flags(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None,
                     title: str = "training configuration") -> None:
    """Add one flag per :class:`TrainConfig` field to ``parser`` (those named in ``only``)."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(TrainConfig):
        if only is not None and f.name not in only:
            continue
        default = f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f.metadata["help"]
        if shown not in (None, ""):
            help_text += f" (default: {shown})"
        if f.name == "recipe":
            help_text += ": " + "; ".join(f"{name} ({_recipe_text(values)})"
                                          for name, values in RECIPES.items())
        # SUPPRESS: only the flags given on the command line reach config_from_args,
        # so that they, and only they, override the recipe's values.
        group.add_argument(_flag(f), *f.metadata["aliases"], dest=f.name,
                           type=_parser_for(f), choices=f.metadata["choices"],
                           default=argparse.SUPPRESS, help=help_text.replace("%", "%%"),
                           metavar=None if f.metadata["choices"] else f.name.upper())


def _recipe_text(values: dict[str, Any]) -> str:
    if not values:
        return "the defaults"
    return " ".join(f"{_flag(_FIELDS[k])} {','.join(map(str, v)) if isinstance(v, tuple) else v}"
                    for k, v in values.items())


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def config_from_args(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    """Build and validate a :class:`TrainConfig`: ``--recipe``'s values (default
    ``tutorial``), then the flags given on the command line, then ``overrides``."""
    kw = {name: getattr(args, name) for name in _FIELDS if hasattr(args, name)}
    kw.update(overrides)
    return TrainConfig.from_recipe(kw.pop("recipe", "tutorial"), **kw)
