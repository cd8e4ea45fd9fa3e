"""The model: methods, config, the CHTsL layer and its sparse storage, the Llama model, budget and presets."""
