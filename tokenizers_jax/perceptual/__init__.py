"""Frozen pretrained networks used by losses and metrics, in Flax (NHWC, fp32).

- `lpips`: LPIPS v0.1 on a VGG16 trunk (`vgg`): FlowMo's pretraining perceptual loss and an
  evaluation metric. `lpips_distance(params, x, y)`.
- `resnet`: torchvision ResNet-50 and FlowMo's post-training logit-MSE loss.
  `resnet_logit_mse(params, x, y)`.
- `inception`: pytorch-fid's FID InceptionV3. `inception_features(params, images01)`, and
  `inception_outputs` (pool, sFID spatial features, classifier logits) for generation metrics.

Each module has `load_<name>_params(path=None, allow_random_init=False)`; the weights are
converted once with `python -m tokenizers_jax.convert lpips|resnet50|inception`.
"""
