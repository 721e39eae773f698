"""``hyspark_env``: print the shell line that lets nnU-Net find this package's trainers.

Usage: ``eval "$(hyspark_env)"``. nnU-Net 2.8 searches its own package and then the
folders in ``nnUNet_extTrainer``; we add ours, keeping any folders already listed.
"""
from __future__ import annotations

import argparse
import os
import shlex

import nnunet_hyspark.trainers.nnunet_lookup as lookup
from nnunet_hyspark.errors import cli_entry


def trainer_lookup_folder() -> str:
    """The folder to list in ``nnUNet_extTrainer``."""
    return os.path.dirname(os.path.abspath(lookup.__file__))


def ext_trainer_value(current: str | None = None) -> str:
    """``nnUNet_extTrainer`` with our folder first and existing entries kept (no duplicates)."""
    ours = trainer_lookup_folder()
    others = [p for p in (current or "").split(os.pathsep) if p and os.path.abspath(p) != ours]
    return os.pathsep.join([ours, *others])


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="hyspark_env",
        description='Print the export that makes nnU-Net find the HySparK trainers. Use: eval "$(hyspark_env)"')
    parser.parse_args(argv)
    print(f"export nnUNet_extTrainer={shlex.quote(ext_trainer_value(os.environ.get('nnUNet_extTrainer')))}")


if __name__ == "__main__":
    main()
