"""``--care.*`` options of the OpenRLHF adapter and how they travel to the Ray actors.

Two kinds of flags share the ``--care.`` prefix:

* adapter options (:class:`OpenRLHFCareOptions`): where labels and CARE state live, which oracle
  sells labels, how answers are read, what "drop" means, how hidden states are captured;
* every scalar field of the core's :class:`care_ext.config.CareConfig` (``--care.strategy``,
  ``--care.budget_frac``, ``--care.alpha``, ``--care.warmup_steps``, ``--care.device``, ...), with
  the core's defaults (docs/core.md). ``group_size`` is not a flag: it is always OpenRLHF's
  ``--rollout.n_samples_per_prompt``.

The launcher parses and strips these flags, serialises the result to JSON in the environment
variable :data:`ENV_VAR`, and Ray hands that variable to every actor of the job (the trainer and
the policy workers read it there).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field

from care_ext.config import CareConfig

ENV_VAR = "CARE_OPENRLHF_OPTIONS"
"""Environment variable carrying the JSON of :meth:`OpenRLHFCareOptions.to_json` to the actors."""

DROP_MODES = ("zero", "remove")
FEATURE_DTYPES = ("native", "float32", "bfloat16")
CAPTURE_MODES = ("auto", "on", "off")
WORKER_REDUCE_MODES = ("off", "first_layer")
TASKS = ("auto", "math", "kk")
_NOT_FLAGS = {"group_size", "hidden_size", "extra"}


@dataclass
class OpenRLHFCareOptions:
    """Adapter options (each is the flag ``--care.<name>``) plus the core config overrides."""

    label_store: str | None = None
    """SQLite label store + budget ledger. None: ``<--ckpt.path>/care/labels.sqlite``."""
    state_dir: str | None = None
    """Where CARE state checkpoints go, one per OpenRLHF checkpoint step. None: ``<--ckpt.path>/care``."""
    oracle: str = "gold"
    """Who sells labels: ``gold`` = the ``answer`` of the label column (simulation; enables the
    simulation-only strategies and ``sim/*`` metrics); ``callable:pkg.module:function`` = a
    user function ``fn(uid, payload) -> gold answer`` (verifier, LLM judge, annotation service),
    called with retries (payload: uid, task, prompt, responses)."""
    oracle_retries: int = 2
    """Extra tries of a failing ``callable`` oracle call before the prompt is dropped uncharged."""
    oracle_timeout_s: float = 60.0
    """Per-call timeout of a ``callable`` oracle."""
    task: str = "auto"
    """How answers are read: ``auto`` = the label's ``task`` field (default ``math``);
    ``math`` (last ``\\boxed{}``) or ``kk`` (Knights and Knaves ``<answer>``) for every prompt."""
    answer_workers: int = 2
    """Worker processes of the answer clusterer (math-verify equivalence) in the trainer actor."""
    drop_mode: str = "zero"
    """DROPPED prompts: ``zero`` = advantage 0, rows stay in the batch (paper behaviour; they still
    count in the token-mean loss normaliser and cost a backward pass); ``remove`` = the rows leave
    the training batch down to whole optimizer steps: only as many zero-weight rows stay as make
    the row count a multiple of ``--train.batch_size`` (one optimizer step, all DP ranks), so
    nothing leaves when one step is the whole rollout (``--train.batch_size`` = rollout.batch_size
    x G); the rows are repacked into experiences of ``--train.micro_batch_size`` rows."""
    feature_dtype: str = "native"
    """dtype the policy workers ship captured hidden states in: ``native`` (the model's, bf16 in
    training), ``float32`` or ``bfloat16`` (cast on the GPU before the copy to the CPU)."""
    capture: str = "auto"
    """lm_head-input capture in the policy workers' experience forward: ``auto`` = on for the CARE
    family of strategies (they need hidden states), off otherwise; ``on``; ``off`` (refused for
    the CARE family, which cannot decide without hidden states)."""
    worker_reduce: str = "off"
    """What the policy workers ship per sample: ``off`` = the two captured hidden states (2H values
    in ``feature_dtype``); ``first_layer`` = those states already multiplied on the GPU by the
    hidden-state columns of both classifiers' first layers (2P + 2R1 float32 values, 384 with the
    default dims, instead of 2H), the raw rows kept on the workers for one step and fetched back
    only for the prompts the classifiers train on (bought, cached, awaiting a label). Each step
    the trainer sends the current weights (2 x (P + R1) x H float32, 6 MB at H = 4096) to every
    worker first; the first step ships raw states (the classifiers are built from it). Pays off
    when samples x H is large next to that (e.g. G = 64) and moves ~85% of the decide step's
    multiply-adds to the GPU; decisions equal the ``off`` ones to float32 rounding (care_ext.projection)."""
    require_state_on_resume: bool = True
    """Resuming an OpenRLHF checkpoint (``--ckpt.load_enable``) without the matching CARE state
    is an error (True) or starts CARE from scratch with a warning (False)."""
    core: dict = field(default_factory=dict)
    """CareConfig overrides from ``--care.<core field>`` flags (the core's defaults otherwise)."""

    def __post_init__(self) -> None:
        for name, allowed in (("drop_mode", DROP_MODES), ("feature_dtype", FEATURE_DTYPES),
                              ("capture", CAPTURE_MODES), ("task", TASKS),
                              ("worker_reduce", WORKER_REDUCE_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--care.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not (self.oracle == "gold" or self.oracle.startswith("callable:")):
            raise ValueError(f"--care.oracle must be 'gold' or 'callable:module:function', got {self.oracle!r}")
        bad = set(self.core) - {f.name for f in dataclasses.fields(CareConfig)}
        if bad:
            raise ValueError(f"unknown CareConfig fields {sorted(bad)}")
        if self.worker_reduce != "off" and not self.needs_hidden_states():
            raise ValueError(f"--care.worker_reduce {self.worker_reduce} reduces captured hidden states, "
                             "but capture is off (--care.capture off, or a strategy without classifiers)")
        strategy = self.core.get("strategy", CareConfig.strategy)
        if self.capture == "off" and self._strategy_learned(strategy):
            raise ValueError(f"--care.capture off, but --care.strategy {strategy} learns from "
                             "hidden states (the CARE family's classifiers): use --care.capture "
                             "auto (or on)")

    def care_config(self, group_size: int) -> CareConfig:
        """The core config for G = ``group_size`` (OpenRLHF's ``--rollout.n_samples_per_prompt``)."""
        return CareConfig(**{**self.core, "group_size": int(group_size)})

    @staticmethod
    def _strategy_learned(name: str) -> bool:
        """Whether strategy ``name`` needs hidden states (it trains the CARE classifiers)."""
        from care_ext.strategies import get_strategy

        return bool(get_strategy(name).learned)

    def needs_hidden_states(self) -> bool:
        """Whether the policy workers must capture hidden states (``capture`` resolved)."""
        if self.capture != "auto":
            return self.capture == "on"
        return self._strategy_learned(self.core.get("strategy", CareConfig.strategy))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "OpenRLHFCareOptions":
        return cls(**json.loads(text))

    @classmethod
    def from_env(cls, environ: typing.Mapping[str, str] | None = None) -> "OpenRLHFCareOptions":
        """Options from :data:`ENV_VAR`; defaults when it is unset."""
        text = (os.environ if environ is None else environ).get(ENV_VAR)
        return cls.from_json(text) if text else cls()


# ----------------------------------------------------------------------------------------------
def _scalar_type(tp) -> tuple[type, bool]:
    """(python type, optional) of a dataclass field annotation (string annotations resolved)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", ())):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _converter(tp):
    tp, optional = _scalar_type(tp)

    def conv(text: str):
        if optional and text.strip().lower() in ("none", "null", ""):
            return None
        if tp is bool:
            return _parse_bool(text)
        if tp in (int, float, str):
            return tp(text)
        if typing.get_origin(tp) is tuple or tp is tuple:
            return tuple(float(x) for x in text.split(","))
        raise argparse.ArgumentTypeError(f"unsupported flag type {tp}")
    return conv


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def care_argument_parser() -> argparse.ArgumentParser:
    """argparse parser of every ``--care.*`` flag (adapter options and CareConfig fields)."""
    p = argparse.ArgumentParser(prog="care-openrlhf", add_help=False, allow_abbrev=False)
    g = p.add_argument_group("CARE adapter options")
    for name, tp in _field_types(OpenRLHFCareOptions).items():
        if name == "core":
            continue
        default = getattr(OpenRLHFCareOptions, name, None)
        g.add_argument(f"--care.{name}", dest=f"adapter:{name}", type=_converter(tp),
                       default=argparse.SUPPRESS, metavar=name.upper(),
                       help=f"(default: {default!r}) see docs/openrlhf.md")
    c = p.add_argument_group("CARE core options (care_ext.config.CareConfig, docs/core.md)")
    defaults = CareConfig()
    for name, tp in _field_types(CareConfig).items():
        if name in _NOT_FLAGS:
            continue
        c.add_argument(f"--care.{name}", dest=f"core:{name}", type=_converter(tp),
                       default=argparse.SUPPRESS, metavar=name.upper(),
                       help=f"(default: {getattr(defaults, name)!r})")
    return p


def split_care_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split ``argv`` into (``--care.*`` flags with their values, everything else in order).

    Both ``--care.x v`` and ``--care.x=v`` are accepted; ``--care.group_size`` is rejected (G is
    ``--rollout.n_samples_per_prompt``)."""
    care, rest = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--care."):
            if a.split("=", 1)[0] == "--care.group_size":
                raise ValueError("--care.group_size is not a flag: G is --rollout.n_samples_per_prompt")
            if "=" in a:
                care.append(a)
            else:
                if i + 1 >= len(argv):
                    raise ValueError(f"{a} needs a value")
                care += [a, argv[i + 1]]
                i += 1
        else:
            rest.append(a)
        i += 1
    return care, rest


def parse_care_args(care_argv: list[str]) -> OpenRLHFCareOptions:
    """``--care.*`` flags -> :class:`OpenRLHFCareOptions` (unknown ``--care.*`` flags: SystemExit
    with argparse's message)."""
    ns = care_argument_parser().parse_args(care_argv)
    adapter, core = {}, {}
    for key, value in vars(ns).items():
        kind, name = key.split(":", 1)
        (adapter if kind == "adapter" else core)[name] = value
    opts = OpenRLHFCareOptions(**adapter, core=core)
    opts.care_config(group_size=2)  # validate the core fields now, not inside a Ray actor
    return opts
