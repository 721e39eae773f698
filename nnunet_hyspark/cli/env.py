"""``hyspark_env``: print the shell line that lets nnU-Net find this package's trainers.

Usage: ``eval "$(hyspark_env)"``. nnU-Net 2.8 searches its own package and then the
folders in ``nnUNet_extTrainer``; we add ours, keeping any folders already listed
(:func:`nnunet_hyspark.nnunet_compat.ext_trainer_value`).
"""
from __future__ import annotations

import argparse
import os
import shlex

from nnunet_hyspark.errors import cli_entry
from nnunet_hyspark.nnunet_compat import ext_trainer_value
from nnunet_hyspark.nnunet_compat import our_trainer_folder as trainer_lookup_folder

__all__ = ["ext_trainer_value", "trainer_lookup_folder", "main"]


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="hyspark_env",
        description='Print the export that makes nnU-Net find the HySparK trainers. Use: eval "$(hyspark_env)"')
    parser.parse_args(argv)
    print(f"export nnUNet_extTrainer={shlex.quote(ext_trainer_value(os.environ.get('nnUNet_extTrainer')))}")


if __name__ == "__main__":
    main()
