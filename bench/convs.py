#!/usr/bin/env python
"""The SD 1.5 U-Net step's 3x3 convolutions that Winograd's way can take (stride 1, at least
`WINOGRAD_MIN_CHANNELS` channels, not the upsamplers), each timed every way
`onednn.prepack` can run it here: oneDNN's direct convolution (`PackedConv2d`), our AMX kernel
(`AmxConv2d`, where the CPU has AMX) and Winograd's F(2x2, 3x3) (`WinogradConv2d`, where its
transforms run; here at every map size, where `prepack` keeps maps under `WINOGRAD_MIN_PIXELS`
direct). Random bf16 weights and inputs at the shapes one step (batch 2, 64x64 latent) feeds
them; medians of --runs calls after a warm-up, the ways alternating. The last lines add up over
the step, each shape counted as often as the step calls it, what `prepack(model, winograd=...)`
would run: Winograd's way where it is asked for and the map is large enough, else our AMX kernel
where it takes the convolution, else oneDNN's.

    .venv/bin/python bench/convs.py             # about a minute on 2 cores

This is what `prepack`'s choices rest on (`WINOGRAD_MIN_PIXELS`, `AMX_CONV_MIN_CHANNELS`); the step
itself is timed, every way, by `bench/run.py`. Convolutions that add a residual are timed without
it: the sum costs each way about the same.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter

import ldmkit  # noqa: F401 - before torch: huge pages, as `ldmkit generate` has them
import torch
from torch import nn

from ldmkit import kernels
from ldmkit.cpu import cpu_has_amx, keep_freed_memory
from ldmkit.models import onednn
from ldmkit.models.layers import Upsample
from ldmkit.models.unet import UNet, unet_preset

BF16 = torch.bfloat16


def step_convolutions(preset: str) -> Counter:
    """(batch, in channels, out channels, H, W) -> calls, of the convolutions Winograd's way can take,
    in one CFG step."""
    torch.manual_seed(0)
    unet = UNet(unet_preset(preset)).eval().to(BF16)
    upsamplers = {id(m.conv) for m in unet.modules() if isinstance(m, Upsample)}
    calls = Counter()

    def record(conv, args):
        calls[(args[0].shape[0], conv.in_channels, conv.out_channels, *args[0].shape[2:])] += 1

    for m in unet.modules():
        if (type(m) is nn.Conv2d and onednn._plain_3x3(m) and id(m) not in upsamplers
                and min(m.in_channels, m.out_channels) >= onednn.WINOGRAD_MIN_CHANNELS):
            m.register_forward_pre_hook(record)
    side = unet.config.sample_size
    x = torch.randn(1, unet.config.in_channels, side, side).repeat(2, 1, 1, 1).to(BF16)
    with torch.no_grad():
        unet(x, torch.full((2,), 500.0), torch.randn(2, 77, unet.config.context_dim).to(BF16))
    return calls


def ways(conv: nn.Conv2d) -> dict[str, nn.Module]:
    found = {"oneDNN direct": onednn.PackedConv2d(conv)}
    if onednn._amx_conv_takes(conv):
        found["AMX kernel"] = onednn.AmxConv2d(conv)
    if kernels.winograd_kernel_available():
        found["Winograd"] = onednn.WinogradConv2d(conv, min_pixels=0)  # Winograd's way at every size
    return found


def chosen(way_ms: dict[str, float], pixels: int, winograd: bool) -> float:
    """The time of the way `prepack(..., winograd)` runs a convolution on maps of `pixels`."""
    if winograd and pixels >= onednn.WINOGRAD_MIN_PIXELS and "Winograd" in way_ms:
        return way_ms["Winograd"]
    return way_ms.get("AMX kernel", way_ms["oneDNN direct"])


def call_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--preset", default="sd15", help="unet_preset name (default sd15)")
    args = parser.parse_args(argv)
    if not onednn.available(BF16):
        print("oneDNN has no bf16 kernels on this CPU: nothing to compare", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    calls = step_convolutions(args.preset)
    names = ["oneDNN direct", "AMX kernel", "Winograd"]
    step = Counter()  # prepack's choice (winograd True / False) -> ms per step
    print(f"{torch.get_num_threads()} threads, medians of {args.runs}, ms per call\n")
    print("| batch x C -> O at HxW | calls per step | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    with torch.no_grad():
        for (b, c, o, h, w), count in sorted(calls.items(), key=lambda kv: -kv[0][3]):
            conv = nn.Conv2d(c, o, 3, padding=1).to(BF16)
            x = torch.randn(b, c, h, w).to(BF16).contiguous(memory_format=torch.channels_last)
            modules = ways(conv)
            for m in modules.values():
                m(x)  # warm-up
            ms = {name: [] for name in modules}
            for _ in range(args.runs):  # alternating, one call each per round
                for name, m in modules.items():
                    ms[name].append(call_ms(lambda: m(x)))
            way_ms = {name: statistics.median(times) for name, times in ms.items()}
            for winograd in (False, True):
                step[winograd] += chosen(way_ms, h * w, winograd) * count
            cells = [f"{way_ms[name]:.2f}" if name in way_ms else "" for name in names]
            print(f"| {b} x {c} -> {o} at {h}x{w} | {count} | " + " | ".join(cells) + " |")
    default = not cpu_has_amx()
    print()
    for winograd in (False, True):
        note = " (prepack's default here)" if winograd == default else ""
        print(f"per step with prepack(winograd={winograd}){note}: {step[winograd]:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
