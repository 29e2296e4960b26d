"""The SPOFA method: its losses, projector heads, MEMA scaler and the distillers that train with them."""
