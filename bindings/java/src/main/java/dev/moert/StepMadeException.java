package dev.moert;

/**
 * The error of a {@link Session#step()} whose step was made and counted before the call failed,
 * with any code: the update took a parameter past the fp32 range ({@code MOERT_ERR_NUMERIC}), a
 * weight copy could not be made, or another rank failed after the update. The step cannot be
 * undone; {@link #getStep()} gives the learning rate it used and the gradient norm before
 * clipping. A step refused before any change throws a plain {@link MoertException}.
 */
public final class StepMadeException extends MoertException {
  private static final long serialVersionUID = 1L;

  private final Session.Step step;

  StepMadeException(int code, String message, Session.Step step) {
    super(code, message);
    this.step = step;
  }

  /** The figures of the step that was made. */
  public Session.Step getStep() {
    return step;
  }
}
