{
  services.llmhop = {
    enable = true;
    # On every interface, for the front host, which alone has the token.
    openFirewall = true;
    credentials."llmhop.front-token" = "/run/secrets/llmhop/front-token";
    settings.authTokens = [ "\${cred:llmhop.front-token}" ];

    # Two replicas, each tensor parallel over two of the four GPUs.
    vllm = {
      tag = "v0.11.0";
      models.llama-3-70b = {
        port = 20001;
        model = "meta-llama/Llama-3.3-70B-Instruct";
        shmSize = "16g";
        settings.tensor-parallel-size = 2;
        replicas = [
          {
            gpus = [
              "0"
              "1"
            ];
          }
          {
            gpus = [
              "2"
              "3"
            ];
          }
        ];
      };
    };
  };
}
