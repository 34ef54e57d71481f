import dev.moert.Model;
import dev.moert.Moert;
import dev.moert.Session;

/** A Java program that uses the installed moert.jar and libmoert_jni, as a user's would. */
public final class Consumer {
  private Consumer() {}

  public static void main(String[] args) {
    try (Model model = Model.load(args[0]);
        Session session = Session.create(model, null)) {
      float[] out = session.forwardTokens(new int[] {1, 2, 3, 4}, 1);
      System.out.println("consumer: moert " + Moert.version() + ", " + out.length + " outputs");
    }
  }
}
