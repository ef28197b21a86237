"""x86 schedule templates."""
