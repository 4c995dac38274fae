"""Serving VTW to many clients through the OpenAI chat-completions API.

- `errors`: OpenAI's error body and the HTTP status of each failure;
- `auth`: the API key (`--api-key`, `VTW_API_KEY`);
- `limits`: the per-request caps and the body limit derived from them;
- `admission`: a queue slot and a decoding slot before any image is decoded (bounded memory per server);
- `protocol`: an OpenAI chat request -> conversation, images, method and sampling (every limit checked);
- `remote_images`: http(s) image URLs, only where the server allows them;
- `batching`: groups concurrent requests with the same method into one engine call, in one replica;
- `replies`: an answer's JSON and server-sent-event shapes, `stop` sequences;
- `openai_api`: the FastAPI routes (`/v1/chat/completions`, `/v1/models`) over one ModelManager;
- `standalone`: `python -m vtw_core serve` (uvicorn, one process);
- `ray_app`: the same routes as a Ray Serve application: model replicas (one model manager each) behind
  a light ingress;
- `ray_ingress`: the ingress's forwarding, with retries of idempotent requests when a replica dies.
"""
