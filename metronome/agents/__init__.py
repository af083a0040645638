"""Programs that drive the engine on the agent side: loops of requests built from earlier replies."""
