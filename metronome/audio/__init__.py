"""Speech to text: Whisper read from a CTranslate2 folder and run on metronome's own kernels."""
