"""Alignment after SFT: the reward interface, the reward model, and the methods that use them
(RAFT and PPO written here; DPO, KTO, ORPO, SimPO and GRPO through TRL)."""
