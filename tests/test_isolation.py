"""The runtime must import without torch, transformers or optimum: users deploy it without them."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "optimum", "sentence_transformers", "accelerate", "onnx")


def test_engine_imports_no_torch_side_module():
    code = ("import sys, engine, engine.cli, engine.engine, engine.decode, engine.rag, engine.retrieve, engine.store, "
            "engine.update, engine.live, engine.corpus\n"
            f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"engine imported {out.stdout.strip()}"


def test_the_check_would_notice_torch():
    code = f"import sys, torch\nprint(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "torch" in out.stdout


def test_no_pickle_anywhere():
    """Bundles and checkpoints are ONNX, safetensors, JSON and raw arrays: nothing that runs code on load."""
    offenders = []
    for path in sorted((ROOT / "engine").glob("*.py")) + sorted((ROOT / "export").glob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.replace("allow_pickle=False", "")
            if any(word in code for word in ("pickle", "torch.load(", "joblib", "dill")):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders
