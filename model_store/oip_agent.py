"""Build the Java agent that gives TorchServe 0.12 the Open Inference Protocol's model routes.

    python -m model_store.oip_agent          # build (if its inputs changed) and print the jar's path

TorchServe 0.12 answers ``GET /v2/models/{m}`` and ``GET /v2/models/{m}/ready`` with 404, and no
fix will come upstream. model_store/java/ holds our replacement for the frontend's OIP handler
class and an agent that swaps it in as the JVM loads it (model_store/java/mrl/oip/Agent.java says
why not an endpoint plugin). Both compile against the frontend jar of the installed torchserve
wheel; the jar is rebuilt when the sources or that frontend jar change. config.properties starts
the frontend with ``-javaagent:`` pointing at the result (``vmargs``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "model_store" / "java"
JAR = ROOT / ".cache" / "oip" / "mrl-oip.jar"  # config.properties names it, relative to the root
REPLACED = "org/pytorch/serve/http/api/rest/OpenInferenceProtocolRequestHandler"
MANIFEST = "Manifest-Version: 1.0\nPremain-Class: mrl.oip.Agent\nCreated-By: mrl-serve\n\n"


def frontend_jar() -> Path:
    """model-server.jar of the torchserve installed beside this Python (found, not imported:
    handler/ts_handler.py is the only module that imports TorchServe)."""
    spec = importlib.util.find_spec("ts")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("torchserve is not installed beside this Python")
    jar = Path(spec.origin).resolve().parent / "frontend" / "model-server.jar"
    if not jar.is_file():
        raise FileNotFoundError(f"no TorchServe frontend jar at {jar}")
    return jar


def fingerprint(frontend: Path) -> str:
    """What the jar depends on: our sources and the frontend jar they compile against."""
    h = hashlib.sha256(frontend.read_bytes())
    for src in sorted(SOURCES.rglob("*.java")):
        h.update(str(src.relative_to(SOURCES)).encode() + b"\0" + src.read_bytes())
    return h.hexdigest()


def build(jar: Path = JAR, frontend: Path | None = None) -> Path:
    """The agent jar at ``jar``, compiled now unless one from the same inputs is there."""
    frontend = frontend or frontend_jar()
    stamp = jar.with_suffix(".sha256")
    want = fingerprint(frontend)
    if jar.is_file() and stamp.is_file() and stamp.read_text().strip() == want:
        return jar
    javac = shutil.which("javac")
    if javac is None:
        raise SystemExit("javac not found: the OIP agent needs a JDK (setup/debian-packages.txt: "
                         "openjdk-17-jdk-headless; make setup installs it)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        subprocess.run([javac, "--release", "17", "-nowarn", "-cp", str(frontend), "-d", str(out),
                        *map(str, sorted(SOURCES.rglob("*.java")))], check=True)
        classes = sorted(p for p in out.rglob("*.class"))
        replaced = out / f"{REPLACED}.class"
        # Agent, its Swap and Rewrite, Calls, GreedyBatching, InlineSend, the replacement
        if replaced not in classes or len(classes) != 7:
            raise RuntimeError(f"unexpected classes from {SOURCES}: {[str(c.relative_to(out)) for c in classes]}")
        jar.parent.mkdir(parents=True, exist_ok=True)
        part = jar.with_suffix(".part")
        with zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("META-INF/MANIFEST.MF", MANIFEST)
            for cls in classes:
                if cls != replaced:
                    z.write(cls, str(cls.relative_to(out)))
            # Not under its own name: the system class loader must never find it, only the agent.
            z.write(replaced, "mrl/oip/OpenInferenceProtocolRequestHandler.bin")
        part.replace(jar)
    stamp.write_text(want + "\n")
    return jar


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else JAR))
