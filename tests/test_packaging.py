"""A regular (non-editable) install ships every module: build the wheel and look inside."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALLED_AS = {"nnunet_hyspark": "nnunet_hyspark", "trainers": "nnunet_hyspark/trainers",
                "planners": "nnunet_hyspark/planners"}


def test_wheel_contains_every_module_under_the_package_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("nnunet_hyspark-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"{INSTALLED_AS[folder]}/{p.relative_to(ROOT / folder).as_posix()}"
                for folder in INSTALLED_AS for p in (ROOT / folder).rglob("*.py")}
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"
    assert not any(n.startswith(("trainers/", "planners/")) for n in names), "generic top-level names leaked"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for cmd in ("hyspark_synthesize", "hyspark_plan_and_preprocess", "hyspark_pretrain",
                "hyspark_convert_checkpoint", "hyspark_benchmark", "hyspark_env", "hyspark_demo",
                "hyspark_export_weights"):
        assert cmd in text
