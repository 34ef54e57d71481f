package dev.moert;

/**
 * The error of a {@link Session#step()} that was made and counted before it failed: the update
 * took a parameter past the fp32 range ({@code MOERT_ERR_NUMERIC}) and cannot be undone. {@link
 * #getStep()} gives the learning rate it used and the gradient norm before clipping; a step
 * refused before any change throws a plain {@link MoertException}.
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
