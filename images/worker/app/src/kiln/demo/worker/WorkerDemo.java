package kiln.demo.worker;

import java.time.Instant;

/**
 * The demo queue worker of the example image: plain JDK, no dependencies.
 *
 * <p>Stands in for a consumer that polls a queue: it logs a heartbeat every
 * $HEARTBEAT_SECS seconds (default 10), which the bake's smoke test looks for in the
 * upstart log, and says goodbye on SIGTERM.
 */
public final class WorkerDemo {
    private WorkerDemo() {}

    public static void main(String[] args) throws InterruptedException {
        long intervalSecs = Long.parseLong(env("HEARTBEAT_SECS", "10"));
        Runtime.getRuntime().addShutdownHook(new Thread(() -> log("stopping")));
        log("started, heartbeat every " + intervalSecs + " s");
        for (long beat = 1; ; beat++) {
            log("heartbeat " + beat);
            Thread.sleep(intervalSecs * 1000);
        }
    }

    private static String env(String name, String fallback) {
        String value = System.getenv(name);
        return value == null || value.isEmpty() ? fallback : value;
    }

    private static void log(String message) {
        System.out.println(Instant.now() + " worker-demo: " + message);
    }
}
