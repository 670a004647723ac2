# The llmhop part of the vm-containers node (checks/vm.nix), also evaluated here by
# tests/nix/test_nix_vm_checks.py: vLLM and SGLang as rootless containers of their lingering users,
# SGLang behind the SGL Model Gateway, llama.cpp as one rootful container; every image is a
# fake (`fakeImages`, checks/vm/packages.nix) that quadlet-nix loads before its unit starts.
{ lib, fakeImages, ... }:
let
  # What `podman load` names the streamed images; quadlet-nix's imageStream sets the same
  # Image=, so the module's must agree.
  image = "localhost/llmhop-fake-engine";
  # Loaded, never pulled: a pull would hide a failed load.
  fromFakeImage = role: {
    inherit image;
    tag = role;
    quadlet.containerConfig.Pull = "never";
  };
  # The VM's CDI spec maps it to a harmless device node.
  devices = [ "nvidia.com/gpu=all" ];
in
{
  services.llmhop = {
    enable = true;
    host = "127.0.0.1";
    port = 8080;
    credentials."llmhop.worker-key" = "/etc/llmhop/worker-key";
    settings.models.llama-root.headers.Authorization = "Bearer \${cred:llmhop.worker-key}";

    vllm = lib.mkMerge [
      (fromFakeImage "vllm")
      {
        inherit devices;
        models = {
          # On a unix socket, with a credential mounted into the container.
          vllm-sock = {
            model = "fake/vllm-sock";
            credentials."llmhop.hf-token" = "/etc/llmhop/hf-token";
            environment.HF_TOKEN_PATH = "/run/llmhop/credentials/llmhop.hf-token";
          };
          vllm-port = {
            port = 20001;
            model = "fake/vllm-port";
            settings.max-model-len = 4096;
          };
        };
      }
    ];

    sglang = lib.mkMerge [
      (fromFakeImage "sglang")
      {
        inherit devices;
        models = {
          sglang-a = {
            port = 30001;
            model = "fake/sglang-a";
          };
          sglang-b = {
            port = 30002;
            model = "fake/sglang-b";
            settings.mem-fraction-static = 0.5;
          };
        };
        gateway = lib.mkMerge [
          (fromFakeImage "gateway")
          {
            enable = true;
            port = 30000;
            route = "sglang";
            settings.policy = "round_robin";
          }
        ];
      }
    ];

    # The rootful one: a system unit, on a unix socket, with an API key.
    llama-cpp = lib.mkMerge [
      (fromFakeImage "llama-cpp")
      {
        runtime = "container";
        quadlet.user = null;
        models.llama-root = {
          credentials.api-keys = "/etc/llmhop/worker-key";
          settings.api-key-file = "\${cred:api-keys}";
        };
      }
    ];
  };

  virtualisation.quadlet.containers = {
    vllm-vllm-sock.imageStream = fakeImages.vllm;
    vllm-vllm-port.imageStream = fakeImages.vllm;
    sglang-sglang-a.imageStream = fakeImages.sglang;
    sglang-sglang-b.imageStream = fakeImages.sglang;
    sglang-gateway.imageStream = fakeImages.gateway;
    llama-cpp-llama-root.imageStream = fakeImages.llama-cpp;
  };
}
