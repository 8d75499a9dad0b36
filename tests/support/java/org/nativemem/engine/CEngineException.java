package org.nativemem.engine;

/**
 * An error of the C test engine (tests/c/engine.c): the {@code nm_status} a function of the engine
 * ABI returned, and its message (which the engine freed with {@code api->free_message}).
 */
public final class CEngineException extends RuntimeException {
    private static final long serialVersionUID = 1L;

    private final int status;

    /** Called from C. */
    public CEngineException(int status, String message) {
        super(message);
        this.status = status;
    }

    /** @return the {@code nm_status}, one of the {@code CEngine.NM_*} constants */
    public int status() {
        return status;
    }
}
