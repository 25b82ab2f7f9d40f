{
  description = "FlashAttention-2 compatible attention (CPU and CUDA) for the Hugging Face Kernel Hub";

  inputs = {
    # The kernels monorepo holds the current kernel-builder (the old kernel-builder repo is stale).
    kernel-builder.url = "github:huggingface/kernels";
  };

  outputs =
    { self, kernel-builder, ... }:
    kernel-builder.lib.genKernelFlakeOutputs {
      # `self` is required: kernel-builder reads the git revision from it for the ops name.
      inherit self;
      path = ./.;
    };
}
