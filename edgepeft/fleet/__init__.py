"""Server side: fleet inventories, rollout plans and the controller that carries them out (SQLite state)."""
