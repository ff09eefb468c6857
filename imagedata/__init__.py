"""Image data sets on the ground floor: data specs (Fashion-MNIST, han1000, image folders), the
han1000 renderer and its font manifest. Imports nothing of this project but ``handler/``."""
import os
from pathlib import Path

# The offline side's cache (han1000's renders, int8 programs): MRL_CACHE, docs/architecture.md.
CACHE_ROOT = Path(os.environ.get("MRL_CACHE", Path.home() / ".cache" / "mrl-serve"))
