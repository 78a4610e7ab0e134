"""The TorchScript exporter (`torch.onnx.export(..., dynamo=False)`) on a transformers 4.x model
with random weights, exported as most ONNX files in the wild were: input_ids and
attention_mask, dynamic batch and sequence axes.

params: model_type, config (overrides), attn_impl, opset, inputs (names in order),
outputs, dynamic (default true: batch/sequence axes symbolic).
"""

from __future__ import annotations

import os
import warnings

import _protocol


def main() -> None:
    spec, out = _protocol.args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    import transformers

    torch.manual_seed(spec.get("seed", 0))
    config = transformers.AutoConfig.for_model(spec["model_type"], **spec.get("config", {}))
    config.use_cache = False
    model = transformers.AutoModel.from_config(config, attn_implementation=spec["attn_impl"]).eval()
    names, outputs = list(spec["inputs"]), spec.get("outputs", ["last_hidden_state"])

    class Positional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, *args):
            result = self.inner(**dict(zip(names, args)), use_cache=False, return_dict=True)
            return tuple(getattr(result, o) for o in outputs)

    wrapped = Positional().eval()
    inputs = _protocol.load_inputs(out)
    args = tuple(torch.from_numpy(inputs[n]) for n in names)
    with torch.no_grad():
        ref = wrapped(*args)
    dynamic = None
    if spec.get("dynamic", True):
        dynamic = {n: {0: "batch_size", 1: "sequence_length"} for n in names}
        dynamic.update({o: {0: "batch_size", 1: "sequence_length"} for o in outputs})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, args, str(out / "model.onnx"), dynamo=False, opset_version=spec["opset"],
                          input_names=names, output_names=outputs, dynamic_axes=dynamic,
                          do_constant_folding=True)
    _protocol.save_reference(out, [r.numpy() for r in ref])
    _protocol.finish(out, ["model.onnx"], ["torch", "transformers", "onnx"], reference=True)


if __name__ == "__main__":
    main()
