{
  services.llmhop = {
    enable = true;

    # The tokens of the keys below that are not stored as hashes: systemd credentials of the
    # router, never in the Nix store.
    credentials."llmhop.chat-ui-token" = "/run/secrets/llmhop/chat-ui-token";

    apiKeys = {
      # Hashes may sit in the store: `printf %s "$TOKEN" | llmhop hash-token` prints them.
      admin.hash = "10a4c7c9fc5206d6f36dc6944a81bb6f4a3cb0e25014ae3b12e6c3e52712292a";
      family = {
        hash = "99150bc8d5a1488d71dfcc6040af5a27c07414309497e40dcf4b4521ca224658";
        models = [
          "qwen3-8b"
          "gemma"
        ];
      };
      ci = {
        hash = "948b8c2427cd29047839b8e4a27a08763f8befbafa86be5cce8e46217d75e58a";
        models = [ "qwen3-*" ];
        maxConcurrentRequests = 2; # more get 429; the others keep their share
      };
      # A chat UI whose token lives in a file on the host.
      chat-ui = {
        tokenCredential = "llmhop.chat-ui-token";
        models = [
          "qwen3-*"
          "gemma"
        ];
      };
    };

    llama-cpp.models = {
      "qwen3-8b" = {
        port = 18001;
        settings.hf-repo = "unsloth/Qwen3-8B-GGUF:UD-Q4_K_XL";
      };
      "qwen3-0.6b" = {
        port = 18002;
        settings.hf-repo = "unsloth/Qwen3-0.6B-GGUF:Q8_0";
      };
      gemma.settings.hf-repo = "unsloth/gemma-3-4b-it-GGUF:Q4_K_M";
    };
  };
}
