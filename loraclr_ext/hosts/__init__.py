"""Host adapters: the only code that knows a particular model runtime (diffusers, WebUIs)."""
