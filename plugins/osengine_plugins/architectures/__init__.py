"""Built-in architectures: opt, bloom, llama (also Mistral, Qwen2), bert."""
