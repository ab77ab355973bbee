"""How the CARE classes reach OpenRLHF's Ray actors, without a fork.

OpenRLHF builds every actor inside ``openrlhf.cli.train_ppo_ray.train()`` from module
attributes and offers no flag to choose the classes:

* ``openrlhf.trainer.ppo_trainer.PPOTrainer`` (sync mode; imported inside ``train()``),
* ``openrlhf.trainer.ppo_trainer_async.PPOTrainerAsync`` (``--train.async_enable``; imported
  inside ``train()``; its own worker then builds the ``TrainingActor``, see :mod:`.trainer`),
* ``openrlhf.trainer.ray.ppo_actor.PolicyModelActor`` (imported at the top of ``train_ppo_ray``).

:func:`install` replaces them with the CARE actor classes before the launcher runs the stock CLI
module fresh (``runpy``), so its imports pick them up. The CARE classes subclass the undecorated
stock classes (``__ray_metadata__.modified_class``) and are wrapped with the same ``ray.remote``
options; Ray pickles them with a by-reference link to ``care_ext.integrations.openrlhf.trainer`` /
``.workers``, so each worker process imports care_ext (installed on every node) and rebuilds them.

The ``--care.*`` options reach the actors through the environment variable
:data:`~.config.ENV_VAR`, which :func:`install` adds to the ``runtime_env`` of the job's
``ray.init`` call (``train()`` makes it; under ``ray job submit`` it connects to the cluster).
"""
from __future__ import annotations

import functools

from .config import ENV_VAR, OpenRLHFCareOptions
from .version import check_openrlhf_version

_INSTALLED: dict = {}

# (module, attribute, CARE module, CARE class): every stock class the launcher replaces.
_TARGETS = (
    ("openrlhf.trainer.ppo_trainer", "PPOTrainer", ".trainer", "CarePPOTrainer"),
    ("openrlhf.trainer.ppo_trainer_async", "PPOTrainerAsync", ".trainer", "CarePPOTrainerAsync"),
    ("openrlhf.trainer.ray.ppo_actor", "PolicyModelActor", ".workers", "CarePolicyModelActor"),
)


def unwrap_actor(actor_cls) -> tuple[type, dict]:
    """(the undecorated class, its ``ray.remote`` options) of a stock ``@ray.remote`` class."""
    return (getattr(actor_cls, "__ray_metadata__").modified_class,
            dict(getattr(actor_cls, "_default_options", {}) or {}))


def rewrap_actor(cls: type, options: dict):
    """``cls`` as a Ray actor class with the stock class's ``ray.remote`` options."""
    import ray

    return ray.remote(**options)(cls) if options else ray.remote(cls)


def _wrap_ray_init(options_json: str) -> None:
    import ray

    if getattr(ray.init, "_care_wrapped", False):
        ray.init._care_options = options_json
        return
    orig = ray.init

    @functools.wraps(orig)
    def init(*args, **kwargs):
        runtime_env = dict(kwargs.get("runtime_env") or {})
        env_vars = dict(runtime_env.get("env_vars") or {})
        env_vars[ENV_VAR] = init._care_options
        runtime_env["env_vars"] = env_vars
        kwargs["runtime_env"] = runtime_env
        return orig(*args, **kwargs)

    init._care_wrapped = True
    init._care_options = options_json
    init._care_orig = orig
    ray.init = init


def install(options: OpenRLHFCareOptions) -> dict:
    """Put the CARE classes in place of OpenRLHF's and route ``options`` to every actor.

    Sets ``os.environ[ENV_VAR]`` (for actors of a local cluster this process starts), wraps
    ``ray.init`` so the job's ``runtime_env`` carries it, and patches the three module attributes.
    Returns ``{"PPOTrainer": cls, "PPOTrainerAsync": cls, "PolicyModelActor": cls}`` (the classes
    now installed).
    """
    import os

    check_openrlhf_version()
    text = options.to_json()
    os.environ[ENV_VAR] = text
    _wrap_ray_init(text)

    import importlib

    stock, care = [], {}
    for mod_name, attr, care_mod, care_name in _TARGETS:
        mod = importlib.import_module(mod_name)
        stock.append(getattr(mod, attr))
        care[attr] = getattr(importlib.import_module(care_mod, __package__), care_name)
        setattr(mod, attr, care[attr])
    _INSTALLED.setdefault("stock", stock)
    return care


def uninstall() -> None:
    """Restore the stock classes and ``ray.init`` (tests)."""
    import os

    import ray

    if "stock" in _INSTALLED:
        import importlib

        for (mod_name, attr, _, _), cls in zip(_TARGETS, _INSTALLED.pop("stock")):
            setattr(importlib.import_module(mod_name), attr, cls)
    if getattr(ray.init, "_care_wrapped", False):
        ray.init = ray.init._care_orig
    os.environ.pop(ENV_VAR, None)
