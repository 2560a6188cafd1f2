"""Media handling: probe inputs, plan chunks, extract frames and audio with ffmpeg."""
