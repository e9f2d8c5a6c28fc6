"""The Flower App's package: ServerApp, ClientApp and the task they share."""
