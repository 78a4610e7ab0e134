"""optimum-onnx, run as users run it: a transformers model saved to a folder, then
`optimum-cli export onnx --model FOLDER --task TASK OUT`. Random weights from a config
(AutoModel*.from_config), nothing downloaded.

params: model_type, config (overrides), model_class (the transformers class to build),
task (optimum's task name), opset (optional), legacy (optional: --legacy, the
encoder/decoder/decoder_with_past/merged split for seq2seq and decoders), files (the ONNX files
to keep, relative to the export folder). Also runs optimum's own validation (onnxruntime vs
torch), which fails the export when they disagree.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import _protocol


def main() -> None:
    spec, out = _protocol.args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    import transformers

    torch.manual_seed(spec.get("seed", 0))
    config = transformers.AutoConfig.for_model(spec["model_type"], **spec.get("config", {}))
    model = getattr(transformers, spec["model_class"])(config).eval()
    hf_dir = out / "hf"
    model.save_pretrained(hf_dir)
    cmd = [str(Path(sys.executable).with_name("optimum-cli")), "export", "onnx", "--model", str(hf_dir),
           "--task", spec["task"]]
    if spec.get("opset"):
        cmd += ["--opset", str(spec["opset"])]
    if spec.get("legacy"):
        cmd.append("--legacy")
    cmd.append(str(out / "onnx"))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (out / "optimum-cli.log").write_text(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"optimum-cli failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    if "succeeded with the warning" in proc.stdout + proc.stderr:  # its validation only warns
        sys.exit("optimum-cli's validation found onnxruntime and torch disagree (see optimum-cli.log)")
    files = sorted(str(p.relative_to(out)) for p in (out / "onnx").glob("*.onnx"))
    _protocol.finish(out, files, ["torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime"],
                     reference=False, validated_by="optimum-cli export onnx (its onnxruntime vs torch check)",
                     command=" ".join(cmd[1:]))


if __name__ == "__main__":
    main()
