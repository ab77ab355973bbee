"""CARE as a drop-in for OpenRLHF 0.11.2 GRPO (sync/hybrid and async mode). Guide: docs/openrlhf.md.

Launch: ``care-openrlhf <stock openrlhf.cli.train_ppo_ray flags> --care.strategy care ...``
(or ``python -m care_ext.integrations.openrlhf ...``).

Modules (only those marked * import OpenRLHF, and they check the pinned version first):

* :mod:`.version` - the ``openrlhf==0.11.2`` pin and its check.
* :mod:`.config` - ``--care.*`` flags and their route to the Ray actors.
* :mod:`.cli` / ``__main__`` - the launcher. :mod:`.install` - puts the CARE classes in place.
* :mod:`.capture` - lm_head-input capture (last prompt / last response token), padded and packed.
* :mod:`.labels` - the JSON label column (uid, gold answer, task).
* :mod:`.runner` - regrouping by ``index // G``, answers, the CARE core call, state save/load.
* :mod:`.experience` * - the experience maker (rewards, weights, true drop).
* :mod:`.workers` * - the policy worker with capture. :mod:`.trainer` * - the CARE trainers (sync, async).
* :mod:`.reward_func` - a never-throwing ``--reward.remote_url`` grader for the label column.
"""
from .version import REQUIRED_OPENRLHF, OpenRLHFVersionError, check_openrlhf_version

__all__ = ["REQUIRED_OPENRLHF", "OpenRLHFVersionError", "check_openrlhf_version", "main"]


def main(argv=None) -> None:
    """The launcher (console script ``care-openrlhf``); see :func:`.cli.main`."""
    from .cli import main as _main

    _main(argv)
