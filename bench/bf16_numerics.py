"""What bf16 autocast computes on this CPU, whether or not it has bf16 instructions.

On a CPU with AVX512-BF16 or AMX a bf16 dot product multiplies bf16 inputs and weights and accumulates in fp32;
the layer's output is then rounded to bf16. Without those instructions PyTorch still runs bf16 autocast, in
software and much more slowly. This script checks, for every convolution and linear layer of a backbone, how
often the autocast output equals that reference exactly: the fp32 result of the bf16-rounded input, weight and
bias, rounded to bf16. Where (nearly) every output matches, the accuracy of a bf16 run does not depend on whether
the CPU has the instructions, only its speed does. Inputs are each layer's own input in an fp32 forward pass of
random 224 px images; weights are random (``--backbone``'s architecture).

    python bench/bf16_numerics.py
    python bench/bf16_numerics.py --backbone resnet18 --batch 4
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from options import check_backbones, positive


def reference(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """fp32 arithmetic on bf16-rounded operands, rounded to bf16 at the end."""
    r = lambda t: None if t is None else t.bfloat16().float()  # noqa: E731
    if isinstance(layer, torch.nn.Conv2d):
        out = F.conv2d(r(x), r(layer.weight), r(layer.bias), layer.stride, layer.padding, layer.dilation, layer.groups)
    else:
        out = F.linear(r(x), r(layer.weight), r(layer.bias))
    return out.bfloat16()


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at ``x`` (8 significant bits): 2**(e - 8) for 2**(e - 1) <= |x| < 2**e."""
    _, exponent = torch.frexp(x.float())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exponent - 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--batch", type=positive, default=2)
    args = parser.parse_args()
    check_backbones(parser, [args.backbone], "--backbone")

    from cxrkit.models.classifier import build_classifier
    from cxrkit.train.runtime import cpu_supports_bf16

    torch.manual_seed(0)
    model = build_classifier(args.backbone, 3, weights="none").eval()
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, a, o, name=name: inputs.__setitem__(name, a[0]))
             for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    x = torch.randn(args.batch, 3, 224, 224)
    with torch.inference_mode():
        fp32 = model(x)
        for h in hooks:
            h.remove()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x).float()
        equal = near = total = 0
        modules = dict(model.named_modules())
        for name, layer_input in inputs.items():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = modules[name](layer_input)
            ref = reference(modules[name], layer_input)
            equal += int((out == ref).sum())
            total += out.numel()
            near += int(((out.float() - ref.float()).abs() <= bf16_ulp(ref)).sum())
    print(f"CPU bf16 instructions: {'yes' if cpu_supports_bf16() else 'no (PyTorch runs bf16 in software)'}")
    print(f"{args.backbone}: {len(inputs)} conv/linear layers, {total:,} outputs")
    print(f"  equal to the reference (fp32 accumulation of bf16 operands, rounded to bf16): {equal / total:.4%}")
    print(f"  within one bf16 ulp of it: {near / total:.4%}")
    rel = float((bf16 - fp32).norm() / fp32.norm())
    print(f"  whole model, bf16 autocast vs fp32 logits: relative difference {rel:.2e}")


if __name__ == "__main__":
    main()
