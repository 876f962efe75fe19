"""The peer: the reference network in TensorFlow/Keras, timed in graph mode. Runs in its own
environment (``make bench-reference`` makes ``.venv-reference`` with tensorflow-cpu);
``benchmarks/run.py --only b`` runs it beside the app and writes the ratios.

    .venv-reference/bin/python -m benchmarks.keras_reference --steps 5

Built from the Keras example's layer table: Conv3D 3x3x3 valid + ReLU -> MaxPool3D 2 ->
BatchNormalization, filters 64, 64, 128, 256; global average pooling; Dense 512 ReLU; Dropout
0.3; Dense 1 sigmoid; Adam with the example's staircase decay; binary cross-entropy. Prints one
JSON object: median seconds of ``train_on_batch`` at batch 2 and ``predict_on_batch`` at batch
1 on 128x128x64 inputs (the first calls, which trace the graphs, are not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build_model(width: int = 128, height: int = 128, depth: int = 64):  # type: ignore[no-untyped-def]
    import keras
    from keras import layers

    inputs = keras.Input((width, height, depth, 1))
    x = inputs
    for filters in (64, 64, 128, 256):
        x = layers.Conv3D(filters=filters, kernel_size=3, activation="relu")(x)
        x = layers.MaxPool3D(pool_size=2)(x)
        x = layers.BatchNormalization()(x)
    x = layers.GlobalAveragePooling3D()(x)
    x = layers.Dense(units=512, activation="relu")(x)
    x = layers.Dropout(0.3)(x)
    outputs = layers.Dense(units=1, activation="sigmoid")(x)
    model = keras.Model(inputs, outputs, name="3dcnn")
    schedule = keras.optimizers.schedules.ExponentialDecay(
        1e-4, decay_steps=100000, decay_rate=0.96, staircase=True
    )
    model.compile(
        loss="binary_crossentropy",
        optimizer=keras.optimizers.Adam(learning_rate=schedule),
        metrics=["acc"],
    )
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed calls of each kind")
    args = parser.parse_args()
    import numpy as np
    import tensorflow as tf

    model = build_model()
    rng = np.random.default_rng(0)
    x = rng.random((2, 128, 128, 64, 1), dtype=np.float32)
    y = np.array([[0.0], [1.0]], dtype=np.float32)
    train = []
    for i in range(args.steps + 1):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        if i:
            train.append(time.perf_counter() - start)
    one = x[:1]
    predict = []
    for i in range(args.steps + 2):
        start = time.perf_counter()
        model.predict_on_batch(one)
        if i > 1:
            predict.append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "keras_graph_train_step_s": statistics.median(train),
                "keras_graph_predict_s": statistics.median(predict),
                "tensorflow": tf.__version__,
                "threads": {
                    "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                    "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
