"""The `lightning` command: a LightningCLI in subclass mode.

Any LightningModule / LightningDataModule can be named by `class_path` in a config, so one command
runs every job of the project: `lightning fit -c configs/ppap.yaml`.
"""

from lightning.pytorch.cli import LightningCLI


def main(args=None) -> None:
    LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
