"""Classic-model serving: model repository, runtimes, dynamic batcher, v2 tensors and data plane."""
