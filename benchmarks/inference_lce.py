"""The packed runtime against Larq Compute Engine (LCE), the binary-network engine of the
Larq ecosystem, on equivalent 1W1A networks, as ratios measured in one run.

LCE needs TensorFlow and Larq, which signgrad does not depend on, so this optional script
runs in two steps, each in its own environment:

    python benchmarks/inference_lce.py export /tmp/lce        # signgrad's environment
    python -m venv /tmp/lcevenv && /tmp/lcevenv/bin/pip install larq-compute-engine \\
        larq "tensorflow-cpu==2.15.1" safetensors
    PYTHONPATH=. /tmp/lcevenv/bin/python benchmarks/inference_lce.py time /tmp/lce

``export`` writes the packed ResNet-20 and VGG-Small of ``benchmarks/inference.py``
(first and last layer in full precision, batch-norm statistics from random batches).
``time`` builds the same architectures in Larq (``QuantConv2D`` with ``ste_sign`` inputs
and weights, zero padding, batch norm, hardtanh as clipping to [-1, 1], option-A
shortcuts as strided slicing and channel padding), converts them with LCE's converter,
and times, round-robin in one process, LCE's interpreter on NHWC input (its layout)
against ``PackedModel.run`` on NCHW input (signgrad's), outputs included, at batch 1 and
32 on 1 and 2 threads. Weights are random: speed does not depend on their values.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from timing import timed  # noqa: E402  (benchmarks/timing.py: no torch needed)

NETWORKS = ("resnet20", "vgg-small")


def export_models(out: Path) -> None:
    import inference  # benchmarks/inference.py: the same networks

    from signgrad import export

    out.mkdir(parents=True, exist_ok=True)
    for arch in NETWORKS:
        data = export.packed(inference.source(inference.network_of(arch, binary=True)))
        (out / f"{arch}.safetensors").write_bytes(data)
        print(f"wrote {out / f'{arch}.safetensors'}")


def larq_model(arch: str):  # -> tf.keras.Model
    import larq as lq
    import tensorflow as tf

    binary = {
        "input_quantizer": "ste_sign",
        "kernel_quantizer": "ste_sign",
        "kernel_constraint": "weight_clip",
        "use_bias": False,
        "padding": "same",
    }

    def act(x):
        return tf.keras.layers.Activation(lambda v: tf.clip_by_value(v, -1.0, 1.0))(x)

    def bn(x):
        return tf.keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(x)

    inp = tf.keras.Input((32, 32, 3))
    if arch == "resnet20":
        x = act(bn(tf.keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(inp)))
        for i, c in enumerate((16, 32, 64)):
            for b in range(3):
                s = 2 if i > 0 and b == 0 else 1
                y = act(bn(lq.layers.QuantConv2D(c, 3, strides=s, **binary)(x)))
                y = bn(lq.layers.QuantConv2D(c, 3, **binary)(y))
                short = x
                if s != 1:  # option A: every other pixel, channels zero-padded
                    short = x[:, ::2, ::2, :]
                    extra = c - x.shape[-1]
                    short = tf.pad(
                        short, [[0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]]
                    )
                x = act(tf.keras.layers.Add()([y, short]))
        x = tf.keras.layers.GlobalAveragePooling2D()(x)
    else:
        x = act(bn(tf.keras.layers.Conv2D(128, 3, padding="same", use_bias=False)(inp)))
        for c, pool in ((128, True), (256, False), (256, True), (512, False), (512, True)):
            x = lq.layers.QuantConv2D(c, 3, **binary)(x)
            if pool:
                x = tf.keras.layers.MaxPool2D(2)(x)
            x = act(bn(x))
        x = tf.keras.layers.Flatten()(x)
    return tf.keras.Model(inp, tf.keras.layers.Dense(10)(x))


def time_models(folder: Path, threads: list[int], rounds: int, warmup: int) -> None:
    import larq_compute_engine as lce
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    from signgrad.runtime import kernels
    from signgrad.runtime import model as runtime

    print(
        f"larq-compute-engine {lce.__version__}, signgrad kernels {kernels.COMPILED}, "
        f"median of {rounds} rounds (batch 1; {max(5, rounds // 4)} at 32)\n"
    )
    print("| network | threads | batch | packed ms | LCE ms | LCE / packed |")
    print("|---|---:|---:|---:|---:|---:|")
    for arch in NETWORKS:
        flat = lce.convert_keras_model(larq_model(arch))
        for t in threads:
            pm = runtime.load(folder / f"{arch}.safetensors", backend="compiled", threads=t)
            interp = Interpreter(flat, num_threads=t)
            for batch in (1, 32):
                x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32), np.float32)
                x_nhwc = np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))
                reps = rounds if batch == 1 else max(5, rounds // 4)
                calls = {
                    "packed": lambda pm=pm, x=x: pm.run(x),
                    "lce": lambda it=interp, x=x_nhwc: it.predict(x),
                }
                ms = timed(calls, reps, warmup)
                print(
                    f"| {arch} | {t} | {batch} | {ms['packed']:.3f} | {ms['lce']:.3f} | "
                    f"{ms['lce'] / ms['packed']:.2f} |",
                    flush=True,
                )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["export", "time"])
    p.add_argument("folder", type=Path)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()
    if args.step == "export":
        export_models(args.folder)
    else:
        time_models(args.folder, args.threads, args.rounds, args.warmup)


if __name__ == "__main__":
    main()
