"""``python -m care_ext.integrations.openrlhf <train_ppo_ray flags> --care.*`` (see :mod:`.cli`)."""
from .cli import main

if __name__ == "__main__":
    main()
