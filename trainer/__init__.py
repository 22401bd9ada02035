"""The shared training loop: `train_and_evaluate(config, workdir)`."""

from trainer.loop import train_and_evaluate  # noqa: F401
