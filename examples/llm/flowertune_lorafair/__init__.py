"""flowertune-lorafair: FlowerTune's LLM app with the server's FedAvg swapped for LoRA-FAIR."""
