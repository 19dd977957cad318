"""Import the package from src/ when it is not installed (e.g. from Ferry's own test run)."""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("ferry_http_probe") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
