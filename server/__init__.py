"""fedmeta's Flower ServerApp and Reptile strategy."""
